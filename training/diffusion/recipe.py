"""The diffusion tasks: the KL autoencoder (`task=vae`) and the latent diffusion UNet on top of it (`task=ldm`)."""

from __future__ import annotations

import os

from hydra.utils import instantiate
from omegaconf import DictConfig

from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, downscale_factor, load_vae
from training.diffusion.cache_check import check_cache
from training.diffusion.export import ExportPipeline, ExportVae
from training.diffusion.unet import load_text_encoder
from training.errors import UserError
from training.recipe import Recipe, write_lineage


def vae_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    vae = load_vae(cfg.model.path, "model.path").train() if cfg.model.get("path") else instantiate(cfg.model)
    datamodule.attach(None, vae.config.sample_size, None, SYMMETRIC_MEAN, SYMMETRIC_STD)
    export = os.path.join(output, "vae")
    return Recipe(
        instantiate(cfg.module, model=vae),
        [ExportVae(export, datamodule, cfg.scale_batches)],
        export,
        ("train/loss", "train/psnr", "val/psnr", "val/ssim"),
    )


def ldm_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    if not cfg.get("vae") or not cfg.get("clip"):
        raise UserError("task=ldm needs vae=<AutoencoderKL folder> and clip=<CLIP folder>")
    vae = load_vae(str(cfg.vae), "vae")
    text_encoder, tokenizer = load_text_encoder(str(cfg.clip), "clip")
    check_cache(cfg.data, cfg, vae, text_encoder, tokenizer)  # a cache of other encoders: refused before training
    size = int(cfg.image_size)
    if size % downscale_factor(vae):
        raise UserError(
            f"image_size={size} is not a multiple of the autoencoder's downscale factor {downscale_factor(vae)}"
        )
    unet = instantiate(
        cfg.model,
        sample_size=size // downscale_factor(vae),
        in_channels=vae.config.latent_channels,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    datamodule.attach(tokenizer, size, tokenizer.model_max_length, SYMMETRIC_MEAN, SYMMETRIC_STD)
    module = instantiate(
        cfg.module,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=instantiate(cfg.noise_scheduler),
    )
    export = os.path.join(output, "pipeline")
    write_lineage(
        output,
        {"clip": os.path.abspath(str(cfg.clip)), "vae": os.path.abspath(str(cfg.vae)), "data": str(cfg.data.path)},
    )
    return Recipe(module, [ExportPipeline(export, cfg.sampler)], export, ("train/loss", "val/loss"))
