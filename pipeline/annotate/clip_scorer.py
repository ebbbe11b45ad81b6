"""`ClipScorer`: image and text embeddings and their cosine, from any `transformers` CLIP folder.

One instance per Ray actor (the model loads once); batches of samples in, three columns out. On a GPU the
forward pass runs in bfloat16 autocast; on CPU in float32. Embeddings leave as float16 (DESIGN.md).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


class ClipScorer:
    def __init__(self, clip_path: str, threads: int | None = None):
        from transformers.utils import logging as hf_logging

        from training.clip.model import load_clip

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(int(threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clip = load_clip(clip_path, device=self.device)
        self.dim = int(self.clip.model.config.projection_dim)

    @torch.inference_mode()
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
            score[ok] = (image_emb * text_emb).sum(-1).numpy()
        batch.update(image_embedding=image_embeds, text_embedding=text_embeds, clip_score=score)
        return batch

    def embed(self, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 embeddings on CPU, (B, D) each."""
        pixels = self.clip.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.clip.tokenizer(
            captions, padding=True, truncation=True, max_length=self.clip.context_length, return_tensors="pt"
        ).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            image = self.clip.model.get_image_features(pixel_values=pixels).pooler_output
            text = self.clip.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
        image = torch.nn.functional.normalize(image.float(), dim=-1).cpu()
        text = torch.nn.functional.normalize(text.float(), dim=-1).cpu()
        return image, text
