"""Latent diffusion's pieces, as diffusers and transformers define them: the UNet built from a config, the
frozen text encoder read from a CLIP folder, the DDPM noise schedule, min-SNR-γ loss weights and the EMA of
the weights. Knows nothing of training loops or distribution."""

from __future__ import annotations

import os

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel
from transformers.utils import logging as transformers_logging

from training.clip.model import require_clip_folder
from training.errors import UserError

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
# The UNet's stages, the units that checkpointing and FSDP wrap (as transformer blocks are for CLIP).
UNET_BLOCKS = ["CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"]


def build_unet(
    *,
    sample_size: int,
    in_channels: int,
    cross_attention_dim: int,
    block_out_channels: list[int],
    layers_per_block: int = 2,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
    cross_attention_blocks: list[bool] | None = None,
) -> UNet2DConditionModel:
    """A fresh text-conditioned UNet. `cross_attention_blocks` says, per resolution from the top, whether the
    block attends to the text (SD: all but the lowest-resolution down block and the first up block)."""
    levels = len(block_out_channels)
    attends = list(cross_attention_blocks) if cross_attention_blocks is not None else [True] * (levels - 1) + [False]
    if len(attends) != levels:
        raise UserError(f"model.cross_attention_blocks has {len(attends)} entries for {levels} block_out_channels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def is_pipeline_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "text_encoder", "config.json"))


def require_text_encoder_folder(path: str, option: str = "clip") -> None:
    """A one-line error for a path that is neither a CLIP folder nor a pipeline folder, before any loading."""
    if not is_pipeline_folder(path):
        require_clip_folder(path, option)


def load_text_encoder(path: str, option: str = "clip") -> tuple[CLIPTextModel, object]:
    """(text encoder, tokenizer) from a CLIP folder (ours, or a Hub CLIP/CLIPTextModel saved to disk), or
    from a diffusers pipeline folder's text_encoder/ and tokenizer/."""
    if is_pipeline_folder(path):
        return (
            CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")).eval(),
            AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        )
    require_clip_folder(path, option)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the vision half of a CLIPModel folder is left out on purpose
    try:
        return CLIPTextModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    finally:
        transformers_logging.set_verbosity(verbosity)


@torch.no_grad()
def encode_text(text_encoder: CLIPTextModel, tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, T, D) last hidden states, tokenised exactly as StableDiffusionPipeline does (padded to the
    tokenizer's length, no attention mask), so training and sampling condition on the same thing."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def noise_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False, **config) -> DDPMScheduler:
    """The training schedule. `zero_terminal_snr` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"): betas rescaled so the last step is pure noise, with trailing timestep spacing so that
    sampling starts there; the exported samplers inherit both from this config. At SNR 0 an ε-prediction target
    carries no information about the image (and min-SNR's weight is 0/0), so it needs v-prediction."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type={prediction_type!r}; expected epsilon or v_prediction")
    if zero_terminal_snr:
        if prediction_type != "v_prediction":
            raise UserError(
                "noise_scheduler.zero_terminal_snr=true needs noise_scheduler.prediction_type=v_prediction "
                f"(got {prediction_type}): at zero SNR the ε target says nothing about the image"
            )
        config = {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return DDPMScheduler(prediction_type=prediction_type, **config)


def sampler(name: str, training_schedule: DDPMScheduler):
    """An inference scheduler with the training schedule's betas and prediction type."""
    if name not in SAMPLERS:
        raise UserError(f"sampler={name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name].from_config(training_schedule.config)


def min_snr_weights(schedule: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction and
    min(SNR, γ)/(SNR + 1) for v-prediction (whose loss already carries SNR + 1); ones without γ."""
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = compute_snr(schedule, timesteps)
    clipped = snr.clamp(max=float(gamma))
    return clipped / (snr + 1) if schedule.config.prediction_type == "v_prediction" else clipped / snr


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """The decay at optimizer step `step` (counted from 0): with warmup, min(decay, (1 + step)/(10 + step)),
    so that early averages do not hold on to the random initialisation."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average ← decay · average + (1 − decay) · model, parameter by parameter (DTensors included)."""
    for kept, current in zip(average.parameters(), model.parameters(), strict=True):
        kept.lerp_(current.detach(), 1.0 - decay)
