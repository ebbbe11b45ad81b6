"""`make demo`: the whole flow that exists so far, on the embedded world. Today: serve → crawl."""

from __future__ import annotations

import os

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
    print(f"\nraw shards in {raw_dir}; the world's ground truth in {world_dir}/ground_truth.parquet")
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    demo(cfg)


if __name__ == "__main__":
    main()
