"""What a task's recipe returns, and the parts recipes share. A recipe is a function
`recipe(cfg, datamodule, output) -> Recipe` that builds the model and its LightningModule, attaches the data
module to them, and names the callbacks that export the result; each model family has its own
(`training/clip/recipe.py`, `training/diffusion/recipe.py`), chosen by the task config's
`recipe._target_`. `training.train` runs any of them the same way (checkpoints, MLflow, resume, summary)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

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


def write_lineage(output: str, lineage: dict) -> None:
    """`<output>/lineage.json`: the folders a model was built from, beside its export (evaluation's default
    judge is the CLIP named here). Every process writes the same bytes; the rename keeps it whole."""
    os.makedirs(output, exist_ok=True)
    temporary = os.path.join(output, f".lineage.{os.getpid()}.json")
    with open(temporary, "w") as f:
        json.dump(lineage, f, indent=2)
    os.replace(temporary, os.path.join(output, "lineage.json"))
