"""What each task trains, as one function per task: `recipe(cfg, datamodule, output)` builds the model and
its LightningModule, attaches the data module to them, and names the callbacks that export the result.
`training.train` runs any of them the same way (checkpoints, MLflow, resume, summary)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from training.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, downscale_factor, load_vae
from training.clip_model import ContrastiveClip, load_clip, require_clip_folder
from training.diffusion import load_text_encoder
from training.diffusion_export import ExportPipeline, ExportVae
from training.errors import UserError
from training.export import ExportClip
from training.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class Recipe:
    module: pl.LightningModule
    callbacks: list[pl.Callback]
    export: str  # the folder users take away
    summary: tuple[str, ...] = ("train/loss", "val/loss")  # metrics the closing summary prints


def prepare_tokenizer(cfg: DictConfig, datamodule, output: str):
    """The run's tokenizer: a given path, else the one this run saved before (a resume, or another rank),
    else trained on the training captions and saved under `<output>/tokenizer`."""
    saved = os.path.join(output, "tokenizer")
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if os.path.exists(os.path.join(saved, "tokenizer.json")):
        return load_tokenizer(saved)
    captions = datamodule.captions(cfg.tokenizer.max_captions)
    tokenizer = train_tokenizer(captions, vocab_size=cfg.tokenizer.vocab_size, max_length=cfg.tokenizer.context_length)
    if rank_zero_only.rank == 0:
        tokenizer.save_pretrained(saved)
    return tokenizer


def build_clip_model(cfg: DictConfig, datamodule, output: str, loss) -> tuple[ContrastiveClip, object]:
    """(model, tokenizer): a CLIP folder to fine-tune (`model.path`), or a fresh one from the model config."""
    bias = getattr(loss, "init_logit_bias", None)
    if cfg.model.get("path"):
        require_clip_folder(cfg.model.path, "model.path")
        bundle = load_clip(cfg.model.path)
        tokenizer = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else bundle.tokenizer
        return ContrastiveClip(bundle.model.train(), logit_bias=bias), tokenizer
    tokenizer = prepare_tokenizer(cfg, datamodule, output)
    init_scale = getattr(loss, "init_logit_scale", None)
    clip = instantiate(cfg.model, tokenizer=tokenizer, **({"logit_scale_init": init_scale} if init_scale is not None else {}))
    return ContrastiveClip(clip, logit_bias=bias), tokenizer


def clip_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    loss = instantiate(cfg.loss)
    model, tokenizer = build_clip_model(cfg, datamodule, output, loss)
    config = model.clip.config
    datamodule.attach(tokenizer, config.vision_config.image_size, config.text_config.max_position_embeddings)
    export = os.path.join(output, "clip")
    return Recipe(instantiate(cfg.module, model=model, loss=loss), [ExportClip(export, tokenizer)], export,
                  ("train/loss", "val/loss", "val/image_to_text_r1", "val/text_to_image_r1", "data/corrupt_skipped"))


def vae_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    vae = load_vae(cfg.model.path, "model.path").train() if cfg.model.get("path") else instantiate(cfg.model)
    datamodule.attach(None, vae.config.sample_size, None, SYMMETRIC_MEAN, SYMMETRIC_STD)
    export = os.path.join(output, "vae")
    return Recipe(instantiate(cfg.module, model=vae), [ExportVae(export, datamodule, cfg.scale_batches)], export,
                  ("train/loss", "train/psnr", "val/psnr"))


def ldm_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    if not cfg.get("vae") or not cfg.get("clip"):
        raise UserError("task=ldm needs vae=<AutoencoderKL folder> and clip=<CLIP folder>")
    vae = load_vae(str(cfg.vae), "vae")
    text_encoder, tokenizer = load_text_encoder(str(cfg.clip), "clip")
    size = int(cfg.image_size)
    if size % downscale_factor(vae):
        raise UserError(f"image_size={size} is not a multiple of the autoencoder's downscale factor {downscale_factor(vae)}")
    unet = instantiate(cfg.model, sample_size=size // downscale_factor(vae), in_channels=vae.config.latent_channels,
                       cross_attention_dim=text_encoder.config.hidden_size)
    datamodule.attach(tokenizer, size, tokenizer.model_max_length, SYMMETRIC_MEAN, SYMMETRIC_STD)
    module = instantiate(cfg.module, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         noise_scheduler=instantiate(cfg.noise_scheduler))
    export = os.path.join(output, "pipeline")
    write_lineage(output, {"clip": os.path.abspath(str(cfg.clip)), "vae": os.path.abspath(str(cfg.vae)),
                           "data": str(cfg.data.path)})
    return Recipe(module, [ExportPipeline(export, cfg.sampler)], export, ("train/loss", "val/loss"))


def write_lineage(output: str, lineage: dict) -> None:
    """`<output>/lineage.json`: the folders a model was built from, beside its export (evaluation's default
    judge is the CLIP named here). Every process writes the same bytes; the rename keeps it whole."""
    os.makedirs(output, exist_ok=True)
    temporary = os.path.join(output, f".lineage.{os.getpid()}.json")
    with open(temporary, "w") as f:
        json.dump(lineage, f, indent=2)
    os.replace(temporary, os.path.join(output, "lineage.json"))


RECIPES = {"clip": clip_recipe, "vae": vae_recipe, "ldm": ldm_recipe}
