"""Exports while training runs: `FolderExport`, the callback that rewrites a task's output folder after
every validation and at the end of training, atomically so a reader never sees half of one. Each model
family says what it writes (`training/clip/export.py`, `training/diffusion/export.py`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytorch_lightning as pl
import torch


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state on CPU of rank 0, gathered from shards under FSDP. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def replace_folder(folder: str, save: Callable[[str], None]) -> None:
    """`save(staging)` writes the folder's new content; it then takes the place of the old one."""
    staging = f"{folder}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save(staging)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(staging, folder)


class FolderExport(pl.Callback):
    """Rewrites `folder` after every validation and at the end of training. Subclasses say how, in `saver`:
    called on every rank (gathering FSDP shards is collective), it returns what writes the folder on rank 0
    and None elsewhere."""

    def __init__(self, folder: str):
        self.folder = folder

    def saver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[str], None] | None:
        raise NotImplementedError

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save = self.saver(trainer, pl_module)
        if save is not None:
            replace_folder(self.folder, save)
        trainer.strategy.barrier("export")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)
