"""MLflow for every command: where runs go, and the few things every run logs.

The default store is `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` points elsewhere
(a team server). Runs land in the experiment named by `MLFLOW_EXPERIMENT_NAME`, else one experiment per
task (`pixelmill-clip`, `pixelmill-zeroshot`, …), else "pixelmill" (the data pipeline).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from training.data.sources import Folder

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "pixelmill"
SWEEP_TAG = "pixelmill.sweep"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name(task: str | None = None) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or (f"{DEFAULT_EXPERIMENT}-{task}" if task else DEFAULT_EXPERIMENT)


def setup_mlflow(task: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_name(task))
    return mlflow


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → `a.b.c: value` params (MLflow keeps params flat and short)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return {k: v[:6000] for k, v in out.items()}


def sweep_parent(sweep_id: str, name: str, task: str | None = None) -> str:
    """The run that groups a Hydra multirun: found by its tag, created by the first job that asks. Every
    launcher works, because no job needs to have started it."""
    mlflow = setup_mlflow(task)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(experiment_name(task))
    found = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=name, tags={SWEEP_TAG: sweep_id})
    return run.info.run_id


def hydra_sweep_dir() -> str | None:
    """The multirun's folder when running as a job of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return os.path.abspath(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def sweep_parent_run(task: str | None = None) -> str | None:
    """The MLflow run grouping this Hydra multirun (created on first use), or None outside a multirun."""
    sweep = hydra_sweep_dir()
    return sweep_parent(sweep, f"sweep {os.path.basename(sweep)}", task) if sweep else None


@contextmanager
def mlflow_run(
    name: str,
    config: dict | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
    task: str | None = None,
):
    """A run logging the resolved config (as params and as `config.json`); nested under the active run if
    there is one, or under `parent_run_id`."""
    mlflow = setup_mlflow(task)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        run_name=name, nested=nested, parent_run_id=None if nested else parent_run_id, tags=tags
    ) as run:
        if config is not None:
            mlflow.log_params(flatten(config))
            mlflow.log_dict(config, "config.json")
        yield run
    if parent_run_id and not nested:  # a sweep's parent ends when its latest job does
        mlflow.MlflowClient().set_terminated(parent_run_id)


def data_lineage(path: str, limit: int = 10) -> dict[str, dict]:
    """The manifests a local dataset was made from, by stage: its own, then those of the folders its config
    names as `selection` and `input`, and so on (shard ← filter ← annotate ← crawl; encode ← shard ← …).
    Each entry: {"path": folder, "manifest": the manifest}."""
    found: dict[str, dict] = {}
    queue = [path]
    while queue and len(found) < limit:
        folder = Folder(queue.pop(0))  # local, or an fsspec URL such as s3://bucket/shards
        try:
            manifest = json.loads(folder.read_text("manifest.json")) if folder.exists("manifest.json") else None
        except (OSError, ValueError):
            manifest = None
        if manifest is None:
            continue
        stage = manifest.get("stage") or folder.url.rsplit("/", 1)[-1]
        if stage in found:
            continue
        found[stage] = {"path": os.path.abspath(folder.url) if folder.local else folder.url, "manifest": manifest}
        config = manifest.get("config") or {}
        queue += [str(config[key]) for key in ("selection", "input") if isinstance(config.get(key), str)]
    return found
