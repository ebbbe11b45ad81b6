"""`python -m pipeline.encode input=<shards> output=<dir> vae=<AutoencoderKL folder> clip=<CLIP folder>`
(options: conf/encode.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.encode.run import encode
from pipeline.errors import run_stage
from training.command_line import hydra_entry


@hydra.main(version_base="1.3", config_path="../../conf", config_name="encode")
def main(cfg: DictConfig) -> None:
    run_stage(encode, cfg)


if __name__ == "__main__":
    hydra_entry(main)
