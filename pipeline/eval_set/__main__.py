"""`python -m pipeline.eval_set source=world|folder output=<dir> […]` (options: conf/eval_set.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.errors import run_stage
from pipeline.eval_set.export import export_eval_set
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="eval_set")
def main(cfg: DictConfig) -> None:
    run_stage(export_eval_set, cfg)


if __name__ == "__main__":
    hydra_entry(main)
