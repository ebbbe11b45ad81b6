"""`python -m evaluation.run benchmark=zeroshot|retrieval clip=<CLIP folder> dataset=<clip_benchmark-layout dir>`
`python -m evaluation.run benchmark=drawbench pipeline=<pipeline folder> prompts=<csv|drawbench|world> [baseline=…]`

The benchmark's config (conf/benchmark/) names the function that runs it: zero-shot and retrieval in
`evaluation/zeroshot/task.py`, text-to-image in `evaluation/t2i/drawbench.py`. Results go to a JSON file in
clip_benchmark's shape (`dataset`, `model`, `task`, `metrics`) and to MLflow (experiment `pixelmill-<task>`
unless MLFLOW_EXPERIMENT_NAME is set): metrics, tables, pictures, and tags tying the numbers to the model (its
folder, its training run) and the data.
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from training.command_line import hydra_entry
from training.errors import run_command


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured benchmark; returns its JSON record."""
    return instantiate(cfg.run)(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    record = run_command(evaluate, cfg)
    metrics = record["metrics"]
    return metrics.get("acc1", metrics.get("image_retrieval_recall@1", metrics.get("clip_score/all", 0.0)))


if __name__ == "__main__":
    hydra_entry(main)
