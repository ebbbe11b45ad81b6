"""MLflow for every command: where runs go, and the few things every run logs.

The default store is `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` points elsewhere
(a team server). Runs land in the experiment named by `MLFLOW_EXPERIMENT_NAME`, else one experiment per
task (`pixelmill-clip`, `pixelmill-zeroshot`, …), else "pixelmill" (the data pipeline).

Every call goes through `tracked_run` (journaled.py): journaled in the output folder and sent in the
background, so a server that goes away never stalls or ends a run; `python -m training.tracking sync
<output>` sends what is left when it comes back after the run.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

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


def sweep_parent(sweep_id: str, name: str, task: str | None = None) -> str | None:
    """The run that groups a Hydra multirun: found by its tag, created by the first job that asks. Every
    launcher works, because no job needs to have started it."""
    from training.tracking.probe import unreachable

    if reason := unreachable(tracking_uri()):  # asked late (evaluation ends with it): do not stall the job
        print(
            f"warning: MLflow at {tracking_uri()} is not answering ({reason}); this run is not grouped "
            f"under sweep {sweep_id}",
            file=sys.stderr,
        )
        return None
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


_ACTIVE: list = []  # the runs open in this process, innermost last: a run opened inside another nests under it


def current_run():
    """The innermost open `tracked_run`, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def tracked_run(
    name: str,
    output: str,
    config: dict | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
    task: str | None = None,
):
    """A run logging the resolved config (as params and as `config.json`), journaled in `output` (see
    journaled.py); nested under the open run if there is one, or under `parent_run_id`. It ends FINISHED,
    or FAILED when the body raises."""
    from training.tracking.journaled import TrackedRun

    outer = current_run()
    parent = outer.run_id if outer else parent_run_id
    tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    run = TrackedRun.start(name, output, experiment_name(task), tags)
    if config is not None:
        run.log_params(flatten(config))
        run.log_dict(config, "config.json")
    _ACTIVE.append(run)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        _ACTIVE.remove(run)
        run.close(status)
    if parent_run_id and outer is None:  # a sweep's parent ends when its latest job does
        TrackedRun.start(name, output, experiment_name(task), run_id=parent_run_id).close("FINISHED")


def data_lineage(path: str, limit: int = 10) -> dict[str, dict]:
    """The manifests a local dataset was made from, by stage: its own, then those of the folders its config
    names as `selection` and `input`, and so on (shard ← filter ← annotate ← crawl; encode ← shard ← …).
    Each entry: {"path": folder, "manifest": the manifest}."""
    from training.data.sources import Folder  # webdataset, torch: only when a run logs its lineage

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
