"""`python -m pipeline.filter input=<metadata> output=<dir> [filter.*=…]` (rules: conf/filter/)."""

import hydra
from omegaconf import DictConfig

from pipeline.errors import run_stage
from pipeline.filter.run import filter_samples
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="filtering")
def main(cfg: DictConfig) -> None:
    run_stage(filter_samples, cfg)


if __name__ == "__main__":
    hydra_entry(main)
