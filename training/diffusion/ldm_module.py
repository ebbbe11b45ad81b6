"""`LdmTraining`: the LightningModule that trains a text-conditioned UNet on the latents of a frozen
autoencoder, conditioned on the states of a frozen CLIP text encoder (Stable Diffusion's recipe).

A step: latents (encoded now, or read from `pipeline.encode`'s cache) → scaled → noised at a random DDPM
timestep (plus offset noise) → the UNet predicts ε or v given the caption's states (a `caption_dropout`
share of them replaced by the empty caption's, for classifier-free guidance) → MSE weighted by min-SNR-γ.
After each optimizer step the EMA copy moves towards the weights. Distribution is Lightning's strategy plus
`training.parallelize` on the UNet (and on its EMA copy, so both are sharded alike).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from training.diffusion.unet import UNET_BLOCKS, ema_decay, ema_update, encode_text, min_snr_weights
from training.parallelize import parallelize
from training.task_module import TaskModule, decay_groups


class LdmTraining(TaskModule):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder,
        tokenizer,
        noise_scheduler: DDPMScheduler,
        optimizer: Callable,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 1.0,
        grad_clip: float | None = 1.0,
        snr_gamma: float | None = 5.0,
        offset_noise: float = 0.0,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        fsdp_param_dtype: str | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.ema = copy.deepcopy(unet).requires_grad_(False)
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer, self.schedule = tokenizer, noise_scheduler
        self.optimizer_factory, self.weight_decay = optimizer, float(weight_decay)
        self.warmup_steps, self.min_lr_ratio, self.grad_clip = int(warmup_steps), float(min_lr_ratio), grad_clip
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self.offset_noise, self.caption_dropout = float(offset_noise), float(caption_dropout)
        self.ema_decay, self.ema_warmup = float(ema_decay), bool(ema_warmup)
        self.gradient_checkpointing, self.compile_blocks = bool(gradient_checkpointing), bool(compile)
        self.fsdp_param_dtype = getattr(torch, fsdp_param_dtype) if fsdp_param_dtype else None
        self.scaling_factor = float(vae.config.scaling_factor)
        self.register_buffer("null_states", encode_text(self.text_encoder, tokenizer, [""]), persistent=False)
        self._prepared = False

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.ema):
            frozen.eval()  # Lightning switches the whole module to train mode each epoch
        return self

    def configure_model(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        mesh = self.fsdp_mesh()
        parallelize(
            self.unet,
            UNET_BLOCKS,
            checkpointing=self.gradient_checkpointing,
            compile=self.compile_blocks,
            mesh=mesh,
            param_dtype=self.fsdp_param_dtype,
        )
        parallelize(self.ema, UNET_BLOCKS, mesh=mesh)  # the same shards as the weights it averages

    def configure_optimizers(self):
        optimizer = self.build_optimizer(decay_groups(self.unet, self.weight_decay))
        return self.warmup_then_cosine(optimizer, self.warmup_steps, self.min_lr_ratio)

    # --- the objective ----------------------------------------------------------------------------------
    @torch.no_grad()
    def conditioning(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents, text states) for a batch of pixels + captions, or of cached encoder outputs."""
        if "latent_moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_moments"])
            states = batch["text_states"]
        else:
            posterior = self.vae.encode(batch["pixel_values"]).latent_dist
            states = encode_text(self.text_encoder, self.tokenizer, batch["captions"])
        latents = posterior.sample() * self.scaling_factor
        if self.caption_dropout > 0:
            dropped = torch.rand(states.shape[0], device=states.device) < self.caption_dropout
            states = torch.where(dropped[:, None, None], self.null_states.to(states.dtype), states)
        return latents, states

    def diffusion_loss(self, batch) -> torch.Tensor:
        latents, states = self.conditioning(batch)
        noise = torch.randn(
            latents.shape, device=latents.device, dtype=latents.dtype
        )  # not _like: its layout follows the input's strides
        if self.offset_noise:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model change overall brightness.
            noise = noise + self.offset_noise * torch.randn(latents.shape[:2] + (1, 1), device=latents.device)
        steps = torch.randint(0, self.schedule.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.schedule.add_noise(latents, noise, steps)
        v = self.schedule.config.prediction_type == "v_prediction"
        target = self.schedule.get_velocity(latents, noise, steps) if v else noise
        prediction = self.unet(noisy, steps, encoder_hidden_states=states).sample
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        return (per_sample * min_snr_weights(self.schedule, steps, self.snr_gamma)).mean()

    def training_step(self, batch, batch_idx):
        loss = self.diffusion_loss(batch)
        n = len(batch["keys"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        # The same noise and timesteps on every validation pass, so the numbers compare across steps.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)
            self.log("val/loss", self.diffusion_loss(batch), sync_dist=True, batch_size=len(batch["keys"]))

    # --- around the optimizer step ----------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        self.clip_gradients_logged(self.unet.parameters(), self.grad_clip)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            decay = ema_decay(self.global_step - 1, self.ema_decay, self.ema_warmup)
            ema_update(self.ema, self.unet, decay)
