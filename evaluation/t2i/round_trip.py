"""The autoencoder's round trip through the world checkers: held-out world scenes (an eval set written by
`python -m pipeline.eval_set source=world`, whose samples carry their scene as `{key}.json`) are resized to the
autoencoder's size, encoded, decoded (the posterior's mode) and judged by the same checkers as DrawBench's world
suite. The score bounds every latent diffusion model on this autoencoder: a colour, count or position that the
round trip loses, no UNet can draw. The originals at the same size are judged too, the checkers' own ceiling.

Attached to `task=vae` by config (`callbacks.round_trip._target_=evaluation.t2i.round_trip.RoundTripCallback`),
it logs `round_trip/<check>` to the training run and writes `<output>/round_trip.json`.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image

from evaluation.t2i.prompt_suites import world_vocabulary
from evaluation.t2i.world_checks import CHECKS, ObjectFinder, judge
from evaluation.zeroshot.datasets import IMAGE_KEYS, EvalSet
from training.data.sources import shard_samples
from training.errors import UserError


def world_scenes(path: str, limit: int | None = None) -> list[tuple[Image.Image, dict]]:
    """(image, scene truth) pairs of a world eval set, in shard order."""
    scenes = []
    for sample in shard_samples(EvalSet.open(path).shards, handler=wds.reraise_exception):
        if "json" not in sample:
            raise UserError(
                f"dataset={path}: sample {sample['__key__']} has no .json scene; write the set with "
                "python -m pipeline.eval_set source=world"
            )
        data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        scenes.append((Image.open(io.BytesIO(data)).convert("RGB"), json.loads(sample["json"])))
        if limit is not None and len(scenes) >= limit:
            break
    return scenes


def _to_pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def _rates(verdicts: list[dict]) -> dict[str, float]:
    return {name: float(np.mean([v[name] for v in verdicts])) for name in (*CHECKS, "correct")}


@torch.no_grad()
def round_trip_scores(vae, scenes: list[tuple[Image.Image, dict]], batch_size: int = 64) -> dict:
    """{'round_trip': {check: share passed, 'correct': all passed}, 'original': the same for the resized
    originals, 'scenes': n}. The autoencoder runs where its weights are, in eval mode, and is put back as found."""
    if not scenes:
        raise UserError("the autoencoder's round trip needs at least one world scene")
    finder = ObjectFinder(world_vocabulary()["colours"])
    size = int(vae.config.sample_size)
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    originals, decoded = [], []
    try:
        for start in range(0, len(scenes), batch_size):
            images = [
                image.resize((size, size), Image.Resampling.BICUBIC) for image, _ in scenes[start : start + batch_size]
            ]
            pixels = _to_pixels(images).to(device)
            latents = vae.encode(pixels).latent_dist.mode()
            originals += images
            decoded += _to_images(vae.decode(latents).sample.float())
    finally:
        vae.train(was_training)
    truths = [truth for _, truth in scenes]
    return {
        "round_trip": _rates([judge(t, finder(image)) for t, image in zip(truths, decoded)]),
        "original": _rates([judge(t, finder(image)) for t, image in zip(truths, originals)]),
        "scenes": len(scenes),
    }


class RoundTripCallback(pl.Callback):
    """Every `every_n_steps` (and at the end), the round trip of `limit` scenes of `dataset`, logged as
    `round_trip/<check>` (and `round_trip/original_correct` once); the last result goes to
    `<default_root_dir>/round_trip.json`. The autoencoder is not sharded (task=vae), so rank 0 does it alone."""

    def __init__(self, dataset: str, every_n_steps: int = 0, limit: int | None = 300, batch_size: int = 64):
        self.dataset, self.every_n_steps, self.batch_size = str(dataset), int(every_n_steps), int(batch_size)
        self.scenes = world_scenes(self.dataset, limit)
        self.last_step = -1

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.last_step or not trainer.is_global_zero:
            return
        self.last_step = trainer.global_step
        scores = round_trip_scores(pl_module.vae, self.scenes, self.batch_size)
        metrics = {f"round_trip/{name}": value for name, value in scores["round_trip"].items()}
        metrics["round_trip/original_correct"] = scores["original"]["correct"]
        if trainer.logger:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        with open(os.path.join(trainer.default_root_dir, "round_trip.json"), "w") as f:
            json.dump({"step": trainer.global_step, "dataset": self.dataset, **scores}, f, indent=2)
        rates = ", ".join(f"{name} {value:.3f}" for name, value in scores["round_trip"].items())
        print(
            f"autoencoder round trip at step {trainer.global_step} ({scores['scenes']} world scenes): {rates} "
            f"(originals {scores['original']['correct']:.3f})"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)
