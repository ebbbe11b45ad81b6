"""The CLIP task: a CLIP (fresh from the model config, or a folder to fine-tune) trained contrastively."""

from __future__ import annotations

import os

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from training.clip.export import ExportClip
from training.clip.model import ContrastiveClip, load_clip, require_clip_folder
from training.recipe import Recipe, prepare_tokenizer
from training.tokenizer import load_tokenizer


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
    clip = instantiate(
        cfg.model, tokenizer=tokenizer, **({"logit_scale_init": init_scale} if init_scale is not None else {})
    )
    return ContrastiveClip(clip, logit_bias=bias), tokenizer


def clip_recipe(cfg: DictConfig, datamodule, output: str) -> Recipe:
    loss = instantiate(cfg.loss)
    model, tokenizer = build_clip_model(cfg, datamodule, output, loss)
    fit_caption_negatives(datamodule)
    config = model.clip.config
    datamodule.attach(tokenizer, config.vision_config.image_size, config.text_config.max_position_embeddings)
    export = os.path.join(output, "clip")
    return Recipe(
        instantiate(cfg.module, model=model, loss=loss),
        [ExportClip(export, tokenizer)],
        export,
        ("train/loss", "val/loss", "val/image_to_text_r1", "val/text_to_image_r1", "data/corrupt_skipped"),
    )


# Enough captions to see which group words a corpus uses. Reading one means reading its whole sample, image
# included, at every start on every rank: kept small.
NEGATIVE_FIT_CAPTIONS = 10_000


def fit_caption_negatives(datamodule) -> None:
    """Hard negative captions (data.caption_negatives) keep only the words the training captions use."""
    negatives = getattr(datamodule, "caption_negatives", None)
    if negatives is None or not hasattr(negatives, "fit"):
        return
    negatives.fit(datamodule.captions(NEGATIVE_FIT_CAPTIONS))
    if rank_zero_only.rank == 0:
        print(f"hard negative captions, words swapped within groups: {negatives.describe()}", flush=True)
