"""The callbacks every training run has, whatever its task: checkpoints to resume from, and randomness per rank."""

from __future__ import annotations

import datetime
import os

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint


def checkpointing(cfg: DictConfig, output: str) -> ModelCheckpoint:
    """`checkpoints/last.ckpt` (what a rerun resumes from) every `checkpoint_every` steps, or every
    `checkpoint_every_minutes` of wall clock when set (long steps, preemptible machines); with
    `checkpoint_keep=k`, also the last k as `step<N>.ckpt`."""
    minutes = cfg.get("checkpoint_every_minutes")
    keep = int(cfg.get("checkpoint_keep") or 0)
    return ModelCheckpoint(
        dirpath=os.path.join(output, "checkpoints"),
        every_n_train_steps=None if minutes else int(cfg.checkpoint_every),
        train_time_interval=datetime.timedelta(minutes=float(minutes)) if minutes else None,
        save_last=True,
        save_top_k=keep,
        monitor="step" if keep else None,  # the highest steps are the last ones
        mode="max",
        filename="step{step:08d}",
        auto_insert_metric_name=False,
    )


class SeedPerRank(pl.Callback):
    """Every rank builds the model from `seed` (identical weights), then draws from `seed + global rank` (as
    open_clip does): otherwise W ranks draw the same noise, timesteps, dropout masks and posterior samples,
    and W GPUs train on one GPU's worth of them. Augmentation is keyed by sample, so it does not depend on this."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
