"""`python -m pipeline.run`: crawl → annotate → filter → shard from one config (conf/run.yaml).

Each stage skips itself when its output is complete, so the expensive stages run once however many filter
configs a sweep tries. Each filter config gets its own selection and shard folders, named after the filter
choice and a hash of its rules, and its own MLflow run (a child of the sweep's run in a multirun).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.annotate.run import annotate
from pipeline.crawl.run import crawl
from pipeline.errors import run_stage
from pipeline.filter.report import log_filter
from pipeline.filter.run import filter_samples
from pipeline.shard.run import shard
from pipeline.storage import Location, config_fingerprint
from training.command_line import hydra_entry


def _filter_choice() -> str:
    """The filter config's name as chosen on the command line (`filter=clip_score`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "filter"
    return str(HydraConfig.get().runtime.choices.get("filter", "filter")).replace("/", "_")


def run_pipeline(cfg: DictConfig) -> dict:
    """Run every stage; returns the shard manifest (its counts say what a sweep produced)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    choice = _filter_choice()
    name = f"{choice}-{config_fingerprint(config['filter'])[:8]}"
    output = config["output"]
    selection_dir, shards_dir = f"{output}/selection/{name}", f"{output}/shards/{name}"
    crawl_manifest = crawl(config["crawl"])
    meta_manifest = annotate(config["annotate"])
    # The filter logs nothing itself: a rerun finds its output complete, yet each pipeline run logs the funnel.
    filter_cfg = {
        "input": config["annotate"]["output"],
        "output": selection_dir,
        "filter": config["filter"],
        "tracking": False,
    }
    shard_cfg = {**config["shard"], "selection": selection_dir, "output": shards_dir}
    if not config["tracking"]:
        filter_samples(filter_cfg)
        manifest = shard(shard_cfg)
        if config.get("sweep_model"):
            train_and_evaluate(config["sweep_model"], shards_dir, f"{output}/models/{name}")
        return manifest
    from training.tracking import sweep_parent_run, tracked_run

    parent = sweep_parent_run()
    tags = {
        "pixelmill.stage": "pipeline",
        "data.crawl_hash": crawl_manifest["content_hash"],
        "data.meta_hash": meta_manifest["content_hash"],
    }
    with tracked_run(f"pipeline {name}", output, config=config, tags=tags, parent_run_id=parent) as run:
        filter_manifest = filter_samples(filter_cfg)
        selection = Location(selection_dir)  # local or object storage, as every stage output
        with selection.fs.open(selection.path("funnel.png"), "rb") as png:
            with selection.fs.open(selection.path("funnel.txt"), "r") as txt:
                log_filter(filter_manifest, png.read(), txt.read())
        shard_manifest = shard(shard_cfg)
        run.log_metrics(
            {
                "crawl.images": crawl_manifest["counts"]["success"],
                "annotate.samples": meta_manifest["counts"]["samples"],
                "shard.samples": shard_manifest["counts"]["samples"],
                "shard.shards": shard_manifest["counts"]["shards"],
            }
        )
        run.set_tags({"data.shards_hash": shard_manifest["content_hash"], "data.shards_path": shards_dir})
        run.log_dict(shard_manifest, "shard/manifest.json")
        if config.get("sweep_model"):
            run.log_metrics(train_and_evaluate(config["sweep_model"], shards_dir, f"{output}/models/{name}"))
    return shard_manifest


def train_and_evaluate(experiment: dict, shards: str, output: str) -> dict[str, float]:
    """A model trained on the shards (conf/train.yaml + the preset `sweep_model.experiment`), evaluated
    zero-shot on `sweep_model.datasets`: the metrics a sweep compares. Training and evaluation are reached
    through the config's `_target_`s: the data pipeline imports neither."""
    from hydra import compose
    from hydra.utils import instantiate

    from training.errors import user_error

    train, evaluate = instantiate(experiment["train"]), instantiate(experiment["evaluate"])
    try:
        train(
            compose(
                "train",
                overrides=[
                    f"+experiment={experiment['experiment']}",
                    f"data.path={shards}",
                    f"output={output}",
                    *experiment.get("overrides", []),
                ],
            )
        )
    except Exception as err:
        # A value the training refuses (a strict threshold that leaves less than a batch) gets no model and no
        # metrics, and the sweep goes on to its other values: its chart shows the gap.
        refusal = user_error(err)
        if refusal is None:
            raise
        print(f"warning: no model for {shards}: {refusal}", file=sys.stderr)
        return {}
    return {
        f"zeroshot.{name}.acc1": evaluate(
            compose(
                "evaluate",
                overrides=[
                    f"clip={output}/clip",
                    f"dataset={path}",
                    f"output={output}/eval_{name}.json",
                    "tracking=false",
                    "progress=false",
                ],
            )
        )["metrics"]["acc1"]
        for name, path in experiment["datasets"].items()
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> float:
    manifest = run_stage(run_pipeline, cfg)
    return float(manifest["counts"]["samples"])  # what a sweep compares: samples kept


if __name__ == "__main__":
    hydra_entry(main)
