"""`python -m pipeline.annotate input=<raw shards> output=<dir> [clip=<CLIP folder>]` (options: conf/annotate.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.annotate.run import annotate
from pipeline.errors import run_stage
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="annotate")
def main(cfg: DictConfig) -> None:
    run_stage(annotate, cfg)


if __name__ == "__main__":
    hydra_entry(main)
