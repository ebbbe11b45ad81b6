"""`make demo`: the whole flow that exists so far, on the embedded world. Today: serve → crawl."""

from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq

import hydra
from hydra import compose
from omegaconf import DictConfig

from pipeline.crawl.run import crawl
from pipeline.errors import run_stage
from pipeline.world.__main__ import write_and_serve


def demo(cfg: DictConfig) -> dict:
    world_dir, raw_dir = os.path.join(cfg.output, "world"), os.path.join(cfg.output, "raw")
    server = write_and_serve(DictConfig({"world": cfg.world, "output": world_dir, "host": cfg.host, "port": cfg.port}))
    try:
        crawl_cfg = compose("crawl", overrides=[f"input={world_dir}/urls.parquet", f"output={raw_dir}", *cfg.crawl])
        manifest = run_stage(crawl, crawl_cfg)
    finally:
        server.stop()
    print(ground_truth_check(world_dir, raw_dir))
    print(f"\nraw shards in {raw_dir}; the world's ground truth in {world_dir}/ground_truth.parquet")
    return manifest


def ground_truth_check(world_dir: str, raw_dir: str) -> str:
    """How many rows ended with the status and reason the world's ground truth expects."""
    truth = pq.read_table(os.path.join(world_dir, "ground_truth.parquet")).to_pylist()
    rows = [r for path in sorted(glob.glob(os.path.join(raw_dir, "0*.parquet")))
            for r in pq.read_table(path, columns=["url", "status", "reason"]).to_pylist()]
    agree = sum((r["status"], r["reason"]) == (t["expected_status"], t["expected_reason"]) for t, r in zip(truth, rows))
    return f"ground truth: {agree} of {len(truth)} rows ended with the status and reason the world expects"


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
