"""`ExportClip`: after every validation and at the end of training, the model as a `transformers` folder
(`CLIPModel.from_pretrained`) with its tokenizer and image processor, replaced atomically so a reader never
sees half of one."""

from __future__ import annotations

import os
import shutil

import pytorch_lightning as pl
import torch
from transformers import CLIPModel

from training.clip_model import ClipBundle, ContrastiveClip, image_processor_for, save_clip


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state on CPU of rank 0, gathered from shards under FSDP. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_clip(trainer: pl.Trainer, pl_module: pl.LightningModule) -> CLIPModel | None:
    """The model being trained as a plain CLIPModel on rank 0's CPU (None elsewhere), whatever the strategy:
    gathered from the root that FSDP sharded (ContrastiveClip), then the CLIPModel's part of it. Every rank
    must call it."""
    config = pl_module.net.clip.config
    whole = full_state_dict(pl_module.net)  # on rank 0 only: the others get an empty dict
    if not trainer.is_global_zero:
        return None
    state = ContrastiveClip.export_state({k.removeprefix("clip."): v for k, v in whole.items() if k.startswith("clip.")})
    fresh = CLIPModel(config)  # on CPU, not meta: non-persistent buffers (position ids) are not in `state`
    fresh.load_state_dict(state)
    return fresh.eval()


class ExportClip(pl.Callback):
    def __init__(self, folder: str, tokenizer):
        self.folder, self.tokenizer = folder, tokenizer

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fresh = gather_clip(trainer, pl_module)
        if fresh is not None:
            staging = f"{self.folder}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            processor = image_processor_for(fresh.config.vision_config.image_size)
            save_clip(staging, ClipBundle(fresh, self.tokenizer, processor))
            if os.path.exists(self.folder):
                shutil.rmtree(self.folder)
            os.replace(staging, self.folder)
        trainer.strategy.barrier("export")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)
