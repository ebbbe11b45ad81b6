"""`ClipScorer`: image and text embeddings and their cosine, from any `transformers` CLIP folder.

One instance per Ray actor (the model loads once); batches of samples in, three columns out. The embedding
is `training.clip.encode.ClipEncoder`'s, the one evaluation uses, so the `clip_score` written here is the
cosine evaluation would compute. On a GPU the forward pass runs in bfloat16 autocast; on CPU in float32.
Embeddings leave as float16 (DESIGN.md).

Every forward pass has the same shape, `batch_size` rows, the tail padded with blank images and empty captions:
a matrix product's rounding depends on how many rows it has, so without the padding the same image's embedding
differed in its last float16 bit depending on which rows Ray happened to batch it with, and the same input
gave a different metadata hash from run to run.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from training.clip.encode import ClipEncoder, cosine


class ClipScorer:
    def __init__(self, clip_path: str, batch_size: int, threads: int | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads or self.device == "cpu":
            # Ray starts an actor of one CPU with OMP_NUM_THREADS=1: half of a 2-core machine for the model.
            # The readers beside it idle while a CLIP of any size works (their decode and signals take a few
            # ms a sample; a ViT-B/32 forward on CPU 80 ms), so by default the model gets every core.
            torch.set_num_threads(int(threads or len(os.sched_getaffinity(0))))
        autocast = torch.bfloat16 if self.device == "cuda" else None
        self.encoder = ClipEncoder.from_folder(clip_path, self.device, autocast_dtype=autocast)
        self.dim = self.encoder.dim
        self.batch_size = int(batch_size)
        self.blank = Image.new("RGB", (self.encoder.image_size, self.encoder.image_size))

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        image_embeds = np.zeros((n, self.dim), np.float16)
        text_embeds = np.zeros((n, self.dim), np.float16)
        score = np.full(n, np.nan, np.float32)
        ok = [i for i, error in enumerate(batch["error"]) if not isinstance(error, str)]  # None or NaN: no error
        if ok:
            images = [Image.open(io.BytesIO(batch["image"][i])).convert("RGB") for i in ok]
            captions = [batch["caption"][i] or "" for i in ok]
            image_emb, text_emb = self.embed(images, captions)
            image_embeds[ok], text_embeds[ok] = image_emb.half().numpy(), text_emb.half().numpy()
            score[ok] = cosine(image_emb, text_emb).numpy()
        batch.update(image_embedding=image_embeds, text_embedding=text_embeds, clip_score=score)
        return batch

    def embed(self, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 embeddings on CPU, (N, D) each, in forward passes of exactly `batch_size`."""
        n, size = len(images), self.batch_size
        pad = -n % size
        return (
            self.encoder.encode_images(images + [self.blank] * pad, size)[:n],
            self.encoder.encode_texts(captions + [""] * pad, size)[:n],
        )
