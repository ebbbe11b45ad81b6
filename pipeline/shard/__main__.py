"""`python -m pipeline.shard input=<raw shards> selection=<filter output> output=<dir>` (options: conf/shard.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.errors import run_stage
from pipeline.shard.run import shard
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="shard")
def main(cfg: DictConfig) -> None:
    run_stage(shard, cfg)


if __name__ == "__main__":
    hydra_entry(main)
