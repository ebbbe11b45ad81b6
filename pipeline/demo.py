"""`make demo`: the flow that exists so far, on the embedded world: serve → crawl → annotate → filter → shard,
then what the ground truth says about it."""

from __future__ import annotations

import os

import hydra
from hydra import compose
from omegaconf import DictConfig

from pipeline.errors import run_stage
from pipeline.run import run_pipeline
from pipeline.world.__main__ import write_and_serve
from pipeline.world.truth import crawl_agreement, dedup_scores


def demo(cfg: DictConfig) -> dict:
    world_dir, out = os.path.join(cfg.output, "world"), cfg.output
    server = write_and_serve(DictConfig({"world": cfg.world, "output": world_dir, "host": cfg.host, "port": cfg.port}))
    try:
        run_cfg = compose("run", overrides=[f"input={world_dir}/urls.parquet", f"output={out}", *cfg.run])
        manifest = run_stage(run_pipeline, run_cfg)
    finally:
        server.stop()
    truth = os.path.join(world_dir, "ground_truth.parquet")
    agree, rows = crawl_agreement(truth, os.path.join(out, "raw"))
    scores = dedup_scores(truth, os.path.join(out, "raw"), manifest["config"]["selection"])
    print(f"\nground truth: {agree} of {rows} rows ended with the status and reason the world expects")
    print(f"  exact copies removed: {scores['exact_copies_removed']} of {scores['exact_copies']}; near-duplicates: "
          f"precision {scores['near_duplicate_precision']:.2f}, recall {scores['near_duplicate_recall']:.2f} "
          f"({scores['near_duplicates']} in the world)")
    print(f"training shards in {manifest['config']['output']}; MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
