"""`ClipTraining`: the LightningModule for contrastive image–text training.

It owns the optimisation recipe (AdamW with no decay on gains, biases, embeddings and the temperature;
cosine schedule with linear warmup; gradient clipping; the temperature clamped after every step) and what
gets logged. The model (`ContrastiveClip`) and the loss come in built; distribution is Lightning's strategy
plus `training.parallelize` in `configure_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from training.clip.model import ContrastiveClip
from training.parallelize import parallelize
from training.task_module import TaskModule, decay_groups


class ClipTraining(TaskModule):
    def __init__(
        self,
        model: ContrastiveClip,
        loss: nn.Module,
        optimizer: Callable,
        weight_decay: float = 0.2,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = 1.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        fsdp_param_dtype: str | None = None,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        self.net, self.loss = model, loss
        self.optimizer_factory, self.weight_decay = optimizer, float(weight_decay)
        self.warmup_steps, self.min_lr_ratio = int(warmup_steps), float(min_lr_ratio)
        self.grad_clip = grad_clip
        self.gradient_checkpointing, self.compile_blocks = bool(gradient_checkpointing), bool(compile)
        self.fsdp_param_dtype = getattr(torch, fsdp_param_dtype) if fsdp_param_dtype else None
        self.max_log_scale = math.log(max_logit_scale)
        self.corrupt_skipped = 0  # this rank's, over the whole run (kept in checkpoints)
        self._prepared = False

    # --- distribution: Lightning calls this once, before the optimizer exists -----------------------------
    def configure_model(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        parallelize(
            self.net,
            list(self.net.clip._no_split_modules),
            checkpointing=self.gradient_checkpointing,
            compile=self.compile_blocks,
            mesh=self.fsdp_mesh(),
            param_dtype=self.fsdp_param_dtype,
        )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.net, self.weight_decay))
        return self.warmup_then_cosine(optimizer, self.warmup_steps, self.min_lr_ratio)

    # --- steps ------------------------------------------------------------------------------------------
    def _features(self, batch):
        image, text, logit_scale, logit_bias = self.net(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        )
        # The loss in float32 whatever the autocast: log-softmax over thousands of logits needs it.
        return image.float(), text.float(), logit_scale.float(), None if logit_bias is None else logit_bias.float()

    def training_step(self, batch, batch_idx):
        image, text, logit_scale, logit_bias = self._features(batch)
        loss = self.loss(image, text, logit_scale, logit_bias)
        self.corrupt_skipped += int(batch["corrupt"])
        batch_size = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("train/logit_scale", logit_scale.detach().exp(), batch_size=batch_size)
        if logit_bias is not None:
            self.log("train/logit_bias", logit_bias.detach().squeeze(), batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        self.log(
            "data/corrupt_skipped", float(self.corrupt_skipped), reduce_fx="sum", sync_dist=True, batch_size=batch_size
        )
        return loss

    def validation_step(self, batch, batch_idx):
        image, text, logit_scale, logit_bias = self._features(batch)
        loss = self.loss(image, text, logit_scale, logit_bias)
        similarity = image @ text.T  # (N, N), this rank's batch
        target = torch.arange(image.shape[0], device=image.device)
        n = image.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.log("val/image_to_text_r1", (similarity.argmax(1) == target).float().mean(), sync_dist=True, batch_size=n)
        self.log("val/text_to_image_r1", (similarity.argmax(0) == target).float().mean(), sync_dist=True, batch_size=n)

    # --- after the gradient, around the optimizer step -------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        self.clip_gradients_logged(self.net.parameters(), self.grad_clip)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # open_clip's clamp: exp(logit_scale) ≤ 100, on the parameter itself, so the export obeys it too.
        with torch.no_grad():
            self.net.clip.logit_scale.clamp_(0, self.max_log_scale)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["corrupt_skipped"] = self.corrupt_skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.corrupt_skipped = int(checkpoint.get("corrupt_skipped", 0))
