"""The KL autoencoder of latent diffusion: diffusers' `AutoencoderKL` built from a small config or loaded
from a folder, the patch discriminator that sharpens it late in training, and the two numbers the recipe
needs from it (PSNR, edge sharpness, and the latent scale factor). Knows nothing of training loops or distribution."""

from __future__ import annotations

import math
import os

import torch
from diffusers import AutoencoderKL
from torch import nn

from training.errors import UserError

# The autoencoder sees pixels in [-1, 1]: normalising with mean 0.5 and std 0.5 per channel.
SYMMETRIC_MEAN, SYMMETRIC_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def build_vae(
    *,
    sample_size: int,
    block_out_channels: list[int],
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 32,
) -> AutoencoderKL:
    """A fresh AutoencoderKL; each block after the first halves the side (SD: 4 blocks, 8× smaller latents)."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def vae_folder(path: str, option: str = "vae") -> str:
    """The AutoencoderKL folder at `path` (ours or any diffusers one) or in a pipeline folder's `vae/`; a
    one-line error naming `option` when there is none, before anything is loaded."""
    for folder in (path, os.path.join(path, "vae")):
        config = os.path.join(folder, "config.json")
        if os.path.exists(config) and '"AutoencoderKL"' in open(config).read():
            return folder
    raise UserError(
        f"{option}={path} is not an AutoencoderKL folder (no config.json of class AutoencoderKL there or in vae/)"
    )


def load_vae(path: str, option: str = "vae") -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(vae_folder(path, option)).eval()


def downscale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = (reconstruction.float().clamp(-1, 1) - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def edge_sharpness(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RMS Sobel gradient of the reconstructions over that of the originals: 1 is as sharp as the originals,
    below 1 blurrier (an L1-trained decoder averages edges away), above 1 noisier. RMS, not the mean magnitude:
    a blur spreads an edge's step over more pixels and keeps its summed magnitude, but lowers its sum of squares."""
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=target.device)
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx and d/dy

    def rms_gradient(images: torch.Tensor) -> torch.Tensor:
        gray = images.float().clamp(-1, 1).mean(1, keepdim=True)  # (B, 1, H, W)
        return torch.nn.functional.conv2d(gray, kernels).pow(2).sum(1).mean().sqrt()

    return rms_gradient(reconstruction) / rms_gradient(target).clamp_min(1e-8)


def kl_per_pixel(posterior, pixels_per_sample: int) -> torch.Tensor:
    """The posterior's KL to N(0, I), summed over the latent and spread over the pixels, so that it weighs
    against a per-pixel L1 as Stable Diffusion's summed losses weigh against each other."""
    return posterior.kl().mean() / pixels_per_sample


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, as in taming-transformers): strided convolutions scoring overlapping patches real
    or fake; one logit per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            wider = channels * min(2**i, 8)
            modules += [
                nn.Conv2d(width, wider, 4, 2 if i < layers - 1 else 1, 1),
                nn.GroupNorm(min(32, wider // 4), wider),
                nn.LeakyReLU(0.2),
            ]
            width = wider
        modules.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, batches, max_batches: int = 16) -> float:
    """1 / std of the posterior samples over some images: what Stable Diffusion's 0.18215 is for its data,
    so that the UNet sees latents of unit variance."""
    count, total, squares = 0, 0.0, 0.0
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        latents = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.sample().double()
        count, total, squares = (
            count + latents.numel(),
            total + latents.sum().item(),
            squares + latents.pow(2).sum().item(),
        )
    if count == 0:
        raise UserError("no images to measure the latent scale on (the data stream is empty)")
    variance = squares / count - (total / count) ** 2
    return 1.0 / math.sqrt(max(variance, 1e-12))
