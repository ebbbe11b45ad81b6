"""`VaeTraining`: the LightningModule that trains a KL autoencoder (Stable Diffusion's first stage).

Loss, as Stable Diffusion trained its KL-f8: L1 reconstruction + a perceptual term (weight-free SSIM by
default, LPIPS from local weights when given; `training.diffusion.perceptual`) + a small KL to N(0, I), and,
from step `discriminator_start` on, a hinge-loss patch discriminator whose term is weighted adaptively
(taming-transformers): λ = discriminator_weight · ‖∇L_rec‖ / ‖∇L_adv‖ at the decoder's last layer, so the
adversarial gradient there stays a fixed fraction of the reconstruction's. A fixed weight does not: at
`decoder.conv_out` the adversarial gradient measured ≈ 44× the reconstruction's, and under gradient clipping
reconstruction learning stalled once the discriminator started.

Generator and discriminator train in one optimizer step: the generator's adversarial term reads the
discriminator through detached weights (so its gradient reaches only the autoencoder), and the
discriminator's term reads detached reconstructions. That keeps Lightning's automatic optimisation, so
gradient accumulation, checkpoints and DDP behave as for every other task. λ comes from
`torch.autograd.grad` on this rank's loss before Lightning's backward (the graph is kept for it): it touches
no `.grad`, so DDP's gradient hooks do not fire twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.func import functional_call

from training.diffusion.autoencoder import (
    PatchDiscriminator,
    edge_sharpness,
    hinge_discriminator_loss,
    kl_per_pixel,
    psnr,
)
from training.diffusion.perceptual import ssim
from training.errors import UserError
from training.task_module import TaskModule, decay_groups

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4  # taming's: λ stays finite when the adversarial gradient vanishes


def hard_pixel_l1(error: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean L1 of each image's worst `fraction` of pixels (error summed over channels): the pixels of small
    objects. In a per-pixel mean a few-pixel object weighs as little as its area, so an autoencoder first learns
    the background and brings small objects back as smudges of the wrong colour; this term keeps their share
    of the loss whatever their area (online hard-example mining, per pixel)."""
    per_pixel = error.sum(1).flatten(1)  # (B, H·W)
    k = max(1, round(fraction * per_pixel.shape[1]))
    return per_pixel.topk(k, dim=1).values.mean() / error.shape[1]


class VaeTraining(TaskModule):
    def __init__(
        self,
        model: AutoencoderKL,
        optimizer: Callable,
        kl_weight: float = 1e-6,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 1.0,
        grad_clip: float | None = 1.0,
        discriminator: dict | None = None,
        discriminator_start: int = 5000,
        discriminator_weight: float = 0.5,
        adaptive_discriminator_weight: bool = True,
        hard_pixel_fraction: float = 0.0,
        hard_pixel_weight: float = 1.0,
    ):
        super().__init__()
        self.vae = model
        self.optimizer_factory, self.weight_decay = optimizer, float(weight_decay)
        self.kl_weight, self.warmup_steps, self.grad_clip = float(kl_weight), int(warmup_steps), grad_clip
        self.min_lr_ratio = float(min_lr_ratio)
        self.perceptual, self.perceptual_weight = perceptual, float(perceptual_weight)
        self.discriminator = PatchDiscriminator(**discriminator) if discriminator else None
        self.discriminator_start, self.discriminator_weight = int(discriminator_start), float(discriminator_weight)
        self.adaptive = bool(adaptive_discriminator_weight)
        if not 0.0 <= hard_pixel_fraction <= 1.0:
            raise UserError(f"module.hard_pixel_fraction={hard_pixel_fraction} is not a fraction in [0, 1]")
        self.hard_pixel_fraction, self.hard_pixel_weight = float(hard_pixel_fraction), float(hard_pixel_weight)

    def configure_model(self) -> None:
        if self.fsdp_mesh() is not None:
            raise UserError("trainer=fsdp shards the UNet and CLIP; train the autoencoder with trainer=cpu, ddp or gpu")

    def configure_optimizers(self):
        groups = decay_groups(self.vae, self.weight_decay)
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "weight_decay": 0.0})
        return self.warmup_then_cosine(self.build_optimizer(groups), self.warmup_steps, self.min_lr_ratio)

    def reconstruct(self, pixels: torch.Tensor, sample: bool = True):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        return self.vae.decode(latents).sample, posterior

    def reconstruction_terms(self, reconstruction: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1, the perceptual distance, and their weighted sum (the loss λ balances the discriminator against)."""
        error = (reconstruction.float() - pixels.float()).abs()
        l1 = error.mean()
        perceptual = self.perceptual(reconstruction, pixels) if self.perceptual is not None else l1.new_zeros(())
        terms = {"l1": l1, "perceptual": perceptual, "reconstruction": l1 + self.perceptual_weight * perceptual}
        if self.hard_pixel_fraction > 0:
            terms["hard_pixels"] = hard_pixel_l1(error, self.hard_pixel_fraction)
            terms["reconstruction"] = terms["reconstruction"] + self.hard_pixel_weight * terms["hard_pixels"]
        return terms

    def adversarial_weight(self, reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor) -> dict:
        """λ for the generator's adversarial term, and the gradient ratio it was measured from (logged)."""
        if not self.adaptive:
            return {"weight": torch.tensor(self.discriminator_weight, device=adversarial_loss.device)}
        last = self.vae.decoder.conv_out.weight
        (rec_grad,) = torch.autograd.grad(reconstruction_loss, last, retain_graph=True)
        (adv_grad,) = torch.autograd.grad(adversarial_loss, last, retain_graph=True)
        rec_norm, adv_norm = rec_grad.norm(), adv_grad.norm()
        weight = (rec_norm / (adv_norm + ADAPTIVE_EPS)).clamp(0, ADAPTIVE_MAX).detach() * self.discriminator_weight
        return {"weight": weight, "ratio": (adv_norm / rec_norm.clamp_min(1e-12)).detach()}

    def generator_losses(self, pixels: torch.Tensor, adversarial_on: bool) -> dict[str, torch.Tensor]:
        """Every term of one step and the total to minimise. Before the discriminator starts, its three forward
        passes are skipped (they cost 30–70% of a step): a zero-weighted sum of its parameters gives each one a
        (zero) gradient instead, so DDP still sees every parameter used on every step."""
        reconstruction, posterior = self.reconstruct(pixels)
        terms = self.reconstruction_terms(reconstruction, pixels)
        terms["kl"] = kl_per_pixel(posterior, pixels[0].numel())
        terms["loss"] = terms["reconstruction"] + self.kl_weight * terms["kl"]
        if self.discriminator is not None and not adversarial_on:
            terms["loss"] = terms["loss"] + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        elif self.discriminator is not None:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            adversarial = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
            critic = hinge_discriminator_loss(self.discriminator(pixels), self.discriminator(reconstruction.detach()))
            balance = self.adversarial_weight(terms["reconstruction"], adversarial)
            terms["loss"] = terms["loss"] + balance["weight"] * adversarial + critic
            terms.update(generator_adversarial=adversarial, discriminator_loss=critic)
            terms.update({f"adversarial_{k}": v for k, v in balance.items()})
        terms["reconstruction_image"] = reconstruction.detach()
        return terms

    def training_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]
        terms = self.generator_losses(pixels, self.global_step >= self.discriminator_start)
        n = pixels.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, sync_dist=True, batch_size=n)
        for name in ("l1", "hard_pixels", "perceptual", "kl", "generator_adversarial", "discriminator_loss"):
            if name in terms:
                self.log(f"train/{name}", terms[name], batch_size=n)
        if "adversarial_ratio" in terms:  # ‖∇adv‖/‖∇rec‖ at conv_out before weighting, and the λ applied
            self.log("train/adversarial_grad_ratio", terms["adversarial_ratio"], batch_size=n)
        if "adversarial_weight" in terms:
            self.log("train/adversarial_weight", terms["adversarial_weight"], batch_size=n)
        self.log("train/psnr", psnr(terms["reconstruction_image"], pixels), prog_bar=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]
        reconstruction, posterior = self.reconstruct(pixels, sample=False)
        n = pixels.shape[0]
        terms = self.reconstruction_terms(reconstruction, pixels)
        kl = kl_per_pixel(posterior, pixels[0].numel())
        self.log("val/l1", terms["l1"], sync_dist=True, batch_size=n)
        self.log("val/psnr", psnr(reconstruction, pixels), sync_dist=True, batch_size=n)
        self.log("val/ssim", ssim(reconstruction.float().clamp(-1, 1), pixels.float()), sync_dist=True, batch_size=n)
        self.log("val/sharpness", edge_sharpness(reconstruction, pixels), sync_dist=True, batch_size=n)
        self.log("val/loss", terms["reconstruction"] + self.kl_weight * kl, sync_dist=True, batch_size=n)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.clip_gradients_logged(self.vae.parameters(), self.grad_clip)
        if self.discriminator is not None:
            self.clip_gradients_logged(self.discriminator.parameters(), self.grad_clip, "train/discriminator_grad_norm")
