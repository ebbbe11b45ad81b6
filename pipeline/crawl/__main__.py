"""`python -m pipeline.crawl input=<url list> output=<dir> [option=value ...]` (options: conf/crawl.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.crawl.run import crawl
from pipeline.errors import run_stage
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="crawl")
def main(cfg: DictConfig) -> None:
    run_stage(crawl, cfg)


if __name__ == "__main__":
    hydra_entry(main)
