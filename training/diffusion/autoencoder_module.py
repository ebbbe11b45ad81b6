"""`VaeTraining`: the LightningModule that trains a KL autoencoder (Stable Diffusion's first stage).

Loss: L1 reconstruction + a small KL to N(0, I), and, from step `discriminator_start` on, a hinge-loss
patch discriminator. Generator and discriminator train in one optimizer step: the generator's adversarial
term reads the discriminator through detached weights (so its gradient reaches only the autoencoder), and
the discriminator's term reads detached reconstructions. That keeps Lightning's automatic optimisation, so
gradient accumulation, checkpoints and DDP behave as for every other task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch.func import functional_call

from training.diffusion.autoencoder import PatchDiscriminator, hinge_discriminator_loss, kl_per_pixel, psnr
from training.errors import UserError
from training.task_module import TaskModule, decay_groups


class VaeTraining(TaskModule):
    def __init__(
        self,
        model: AutoencoderKL,
        optimizer: Callable,
        kl_weight: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        grad_clip: float | None = 1.0,
        discriminator: dict | None = None,
        discriminator_start: int = 5000,
        discriminator_weight: float = 0.5,
    ):
        super().__init__()
        self.vae = model
        self.optimizer_factory, self.weight_decay = optimizer, float(weight_decay)
        self.kl_weight, self.warmup_steps, self.grad_clip = float(kl_weight), int(warmup_steps), grad_clip
        self.discriminator = PatchDiscriminator(**discriminator) if discriminator else None
        self.discriminator_start, self.discriminator_weight = int(discriminator_start), float(discriminator_weight)

    def configure_model(self) -> None:
        if self.fsdp_mesh() is not None:
            raise UserError("trainer=fsdp shards the UNet and CLIP; train the autoencoder with trainer=cpu, ddp or gpu")

    def configure_optimizers(self):
        groups = decay_groups(self.vae, self.weight_decay)
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "weight_decay": 0.0})
        return self.warmup_then_cosine(self.optimizer_factory(groups), self.warmup_steps, min_lr_ratio=1.0)  # constant

    def reconstruct(self, pixels: torch.Tensor, sample: bool = True):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        return self.vae.decode(latents).sample, posterior

    def training_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]
        reconstruction, posterior = self.reconstruct(pixels)
        l1 = (reconstruction.float() - pixels.float()).abs().mean()
        kl = kl_per_pixel(posterior, pixels[0].numel())
        loss = l1 + self.kl_weight * kl
        n = pixels.shape[0]
        if self.discriminator is not None:
            # Before the start the terms are computed with weight 0: DDP then sees every parameter used.
            on = float(self.global_step >= self.discriminator_start)
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            generator_adv = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
            critic = hinge_discriminator_loss(self.discriminator(pixels), self.discriminator(reconstruction.detach()))
            loss = loss + on * (self.discriminator_weight * generator_adv + critic)
            self.log("train/discriminator_loss", critic, batch_size=n)
            self.log("train/generator_adversarial", generator_adv, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("train/l1", l1, batch_size=n)
        self.log("train/kl", kl, batch_size=n)
        self.log("train/psnr", psnr(reconstruction.detach(), pixels), prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]
        reconstruction, posterior = self.reconstruct(pixels, sample=False)
        n = pixels.shape[0]
        self.log("val/l1", (reconstruction.float() - pixels.float()).abs().mean(), sync_dist=True, batch_size=n)
        self.log("val/psnr", psnr(reconstruction, pixels), sync_dist=True, batch_size=n)
        self.log(
            "val/loss",
            (reconstruction.float() - pixels.float()).abs().mean()
            + self.kl_weight * kl_per_pixel(posterior, pixels[0].numel()),
            sync_dist=True,
            batch_size=n,
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        self.clip_gradients_logged(self.vae.parameters(), self.grad_clip)
        if self.discriminator is not None:
            self.clip_gradients_logged(self.discriminator.parameters(), self.grad_clip, "train/discriminator_grad_norm")
