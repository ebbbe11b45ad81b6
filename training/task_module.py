"""`TaskModule`: what the LightningModules of every task (CLIP, autoencoder, latent diffusion) share: weight
decay on matrices only, linear warmup then cosine (or constant), gradient clipping that works on FSDP's
DTensors and logs the norm, the FSDP mesh when the strategy has one, and where a resumed run took over."""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and convolutions only: not on gains, biases, embeddings, the temperature
    (the 1-d ones by their shape, embedding tables by their module)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    decay, rest = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (rest if param.ndim < 2 or id(param) in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class TaskModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.start_step = 0  # after a resume: the step where this process took over (for samples/s)
        self.flops_per_batch: float | None = (
            None  # set by whoever measured it; Lightning's ThroughputMonitor reports MFU
        )

    def on_train_start(self) -> None:
        self.start_step = self.global_step

    def fsdp_mesh(self):
        """The data-parallel mesh under ModelParallelStrategy (FSDP2), else None (one process, or DDP).
        By isinstance: under Ray Train the strategy is a subclass (`training.launchers.RayModelParallelStrategy`)."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            return self.device_mesh["data_parallel"]
        return None

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """`module.optimizer` (the partial each task keeps as `optimizer_factory`) on the parameter groups. Its
        constructor's refusal (`lr=-1`: "Invalid learning rate", an argument it does not take) is the user's
        setting to fix: one line, not a traceback from inside Lightning's fit."""
        from training.errors import UserError

        factory = self.optimizer_factory
        try:
            return factory(groups)
        except (TypeError, ValueError) as err:
            name = getattr(getattr(factory, "func", factory), "__name__", "optimizer")
            raise UserError(f"module.optimizer ({name}): {err}") from err

    def warmup_then_cosine(self, optimizer, warmup_steps: int, min_lr_ratio: float) -> dict:
        """Lightning's optimizer config: linear warmup, then cosine down to `min_lr_ratio` × lr (1: constant)."""
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(int(warmup_steps), max(total - 1, 0))
        schedule = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=float(min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def clip_gradients_logged(
        self, parameters: Iterable[torch.Tensor], max_norm: float | None, name: str = "train/grad_norm"
    ) -> None:
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(parameters, float(max_norm))
            self.log(name, norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
