"""`ClipTraining`: the LightningModule for contrastive image–text training.

It owns the optimisation recipe (AdamW with no decay on gains, biases, embeddings and the temperature;
cosine schedule with linear warmup; gradient clipping; the temperature clamped after every step) and what
gets logged. The model (`ContrastiveClip`) and the loss come in built; distribution is Lightning's strategy
plus `training.parallelize` in `configure_model`.

Contrastive accumulation (`accum_freq=k`, open_clip's `--accum-freq`): each dataloader batch (`data.batch_size`
per rank) is encoded in k micro-batches, so activations are those of one micro-batch, yet the loss and its
gradient are those of the whole batch, every sample a negative for every other. Lightning's
`accumulate_grad_batches` would instead average k small-batch losses (k× fewer negatives), so the two are not
combined. One batch is one optimizer step: `trainer.global_step`, `max_steps`, the schedule, checkpoints and
the data position all count steps of `data.batch_size` samples, whatever k is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from training.clip.model import ContrastiveClip
from training.errors import UserError
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
        accum_freq: int = 1,
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
        self.accum_freq = int(accum_freq)
        if self.accum_freq < 1:
            raise UserError(f"module.accum_freq={accum_freq}: expected a whole number ≥ 1")
        # k backward passes per optimizer step need manual optimization; k = 1 keeps Lightning's automatic loop.
        self.automatic_optimization = self.accum_freq == 1

    def configure_callbacks(self):
        # The first hook that sees the trainer, and it runs before Lightning's own (traceback) refusal of
        # accumulate_grad_batches under manual optimization: say it in one line instead.
        if self.accum_freq > 1 and self.trainer.accumulate_grad_batches != 1:
            raise UserError(
                f"module.accum_freq={self.accum_freq} and trainer.accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches} do not combine: set data.batch_size to the contrastive "
                "batch and module.accum_freq to the number of micro-batches, accumulate_grad_batches to 1"
            )
        return []

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
        optimizer = self.build_optimizer(decay_groups(self.net, self.weight_decay))
        return self.warmup_then_cosine(optimizer, self.warmup_steps, self.min_lr_ratio)

    # --- steps ------------------------------------------------------------------------------------------
    def _features(self, batch):
        """The loss's positional arguments: (image, text, logit_scale, logit_bias), then (negative_text,
        negative_valid) when the batch carries hard negative captions."""
        image, text, logit_scale, logit_bias, negative = self.net(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("negative_input_ids"),
            batch.get("negative_attention_mask"),
        )
        # The loss in float32 whatever the autocast: log-softmax over thousands of logits needs it.
        features = (
            image.float(),
            text.float(),
            logit_scale.float(),
            None if logit_bias is None else logit_bias.float(),
        )
        return features if negative is None else (*features, negative.float(), batch["negative_valid"])

    def training_step(self, batch, batch_idx):
        if self.accum_freq > 1:
            return self._accumulated_training_step(batch)
        features = self._features(batch)
        loss = self.loss(*features)
        self._log_training(batch, loss, features[2], features[3], features[0].shape[0])
        return loss

    def _log_training(self, batch, loss, logit_scale, logit_bias, batch_size: int) -> None:
        self.corrupt_skipped += int(batch["corrupt"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("train/logit_scale", logit_scale.detach().exp(), batch_size=batch_size)
        if logit_bias is not None:
            self.log("train/logit_bias", logit_bias.detach().squeeze(), batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        self.log(
            "data/corrupt_skipped", float(self.corrupt_skipped), reduce_fx="sum", sync_dist=True, batch_size=batch_size
        )

    # --- contrastive accumulation (accum_freq > 1) ------------------------------------------------------
    def _accumulated_training_step(self, batch):
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        loss, logit_scale, logit_bias = self.accumulated_backward(batch, self.manual_backward)
        # Logged before the step: the learning rate this step used, as on the automatic path.
        self._log_training(batch, loss, logit_scale, logit_bias, batch["input_ids"].shape[0])
        optimizer.step()  # runs on_before_optimizer_step: gradient clipping as on the automatic path
        schedule.step()  # manual optimization steps no scheduler by itself
        return loss

    def accumulated_backward(self, batch, backward: Callable[[torch.Tensor], None]):
        """Gradients of the loss over the whole batch, accumulated in `.grad` from k micro-batch passes;
        returns (loss, logit_scale, logit_bias), detached.

        Phase 1 encodes every micro-batch without autograd and keeps its features. Phase 2 encodes micro-batch
        j again with autograd, puts its fresh features in place of the cached ones and calls `backward` on the
        loss over all k×B features: the encoders get ∂L/∂f_j·∂f_j/∂θ, and over the k passes that sums to the
        big-batch gradient without any 1/k. The temperature (and SigLIP's bias) enter the loss directly, so
        each pass would add their whole gradient (open_clip's k× temperature gradient); each adds 1/k here.
        Exact when phase 2 reproduces phase 1's features: no dropout (CLIP's configs have none)."""
        k, n = self.accum_freq, batch["input_ids"].shape[0]
        if "negative_input_ids" in batch:
            raise UserError(
                f"module.accum_freq={k} with data.caption_negatives: hard negatives are not combined with "
                "contrastive accumulation; set module.accum_freq=1 or data.caption_negatives=null"
            )
        if n % k:
            raise UserError(f"data.batch_size={n} is not a multiple of module.accum_freq={k}")
        names = ("pixel_values", "input_ids", "attention_mask")
        micro = [dict(zip(names, parts)) for parts in zip(*(batch[name].split(n // k) for name in names))]
        with torch.no_grad():
            cached = [self._features(m)[:2] for m in micro]
        images, texts = [c[0] for c in cached], [c[1] for c in cached]
        for j, m in enumerate(micro):
            with self._gradient_sync(j == k - 1):  # one all-reduce per step, after the last pass
                image, text, logit_scale, logit_bias = self._features(m)
                loss = self.loss(
                    torch.cat([*images[:j], image, *images[j + 1 :]]),
                    torch.cat([*texts[:j], text, *texts[j + 1 :]]),
                    _scale_gradient(logit_scale, 1 / k),
                    None if logit_bias is None else _scale_gradient(logit_bias, 1 / k),
                )
                # Copied before backward: under FSDP2 the temperature is a view of the unsharded parameter,
                # whose storage the post-backward reshard frees.
                values = [t.detach().clone() for t in (loss, logit_scale, logit_bias) if t is not None]
                backward(loss)
        return values[0], values[1], values[2] if logit_bias is not None else None

    @contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Without `sync`, gradients only accumulate on this rank: DDP's no_sync (through Lightning's
        `block_backward_sync`), FSDP2's `set_requires_gradient_sync(False)`; nothing to do on one device."""
        if sync:
            yield
        elif hasattr(self.net, "set_requires_gradient_sync"):  # fully_shard'ed in configure_model
            self.net.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.net.set_requires_gradient_sync(True)
        else:
            block = getattr(getattr(self._trainer, "strategy", None), "block_backward_sync", None)
            with block() if block is not None else nullcontext():
                yield

    def validation_step(self, batch, batch_idx):
        image, text, logit_scale, logit_bias = self._features(batch)[:4]
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


def _scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor`'s value exactly (x + 0), with its gradient multiplied by `factor`."""
    return tensor.detach() + (tensor - tensor.detach()) * factor
