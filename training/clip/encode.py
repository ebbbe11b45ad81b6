"""`ClipEncoder`: the one way this project embeds with a CLIP (open_clip's `encode_image` / `encode_text`).

Annotation's `clip_score`, zero-shot and retrieval evaluation, the training callback and the DrawBench judge
all embed through it, so a cosine means the same thing wherever it is written or read:

- images: `EvalTransform` (short side resized, centre crop, normalise) at the size and with the mean/std of
  the folder's image processor config, so a folder with other normalisation is read as it declares;
- texts: padded to the text model's context length (`max_position_embeddings`) and truncated there, the
  same as training's data module; the attention mask keeps the padding out of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from training.clip.model import ClipBundle, load_clip
from training.data.transforms import EvalTransform


def _size_field(size, *names: str) -> int | None:
    """A field of an image processor's size dict (a `SizeDict` or a plain dict, depending on the version)."""
    for name in names:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        if value:
            return int(value)
    return None


def processor_image_size(processor, model_image_size: int) -> int:
    """The side the processor hands the model: its crop when it crops, else its resize, else the model's."""
    crop = _size_field(processor.crop_size, "height") if getattr(processor, "do_center_crop", True) else None
    return crop or _size_field(processor.size, "shortest_edge", "height") or int(model_image_size)


@dataclass
class ClipEncoder:
    """Normalised image and text embeddings of a CLIPModel, batched, without gradients, float32 on CPU."""

    model: torch.nn.Module  # CLIPModel
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple
    device: torch.device = torch.device("cpu")
    # Mixed precision for the forward pass (annotation on a GPU uses bfloat16 for throughput); None: the
    # model's own dtype, which is what evaluation uses.
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_bundle(cls, bundle: ClipBundle, device="cpu", autocast_dtype: torch.dtype | None = None) -> ClipEncoder:
        processor = bundle.image_processor
        return cls(
            bundle.model.to(device).eval(),
            bundle.tokenizer,
            processor_image_size(processor, bundle.model.config.vision_config.image_size),
            tuple(processor.image_mean),
            tuple(processor.image_std),
            torch.device(device),
            autocast_dtype,
        )

    @classmethod
    def from_folder(cls, folder: str, device="cpu", autocast_dtype: torch.dtype | None = None) -> ClipEncoder:
        return cls.from_bundle(load_clip(folder, device=device), device, autocast_dtype)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def transform(self) -> EvalTransform:
        return EvalTransform(self.image_size, mean=self.mean, std=self.std)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 3, S, S) model input of PIL images, with the one image preprocessing."""
        transform = self.transform()
        return torch.stack([transform(image) for image in images])

    def tokens(self, texts: list[str]) -> dict:
        """input_ids and attention_mask (N, context_length), with the one text padding and truncation."""
        return self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of PIL images, or of a pixel batch already through `transform()`."""
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else self.pixels(chunk)
            with self._autocast():
                out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            parts.append(F.normalize(out.pooler_output.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of texts; texts longer than the context are truncated, as CLIP must."""
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokens(texts[start : start + batch_size]).to(self.device)
            with self._autocast():
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            parts.append(F.normalize(out.pooler_output.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def pair_scores(self, images, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N,) cosine of image i with text i."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; pair_scores pairs them one to one")
        return cosine(self.encode_images(images, batch_size), self.encode_texts(texts, batch_size))


def cosine(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(N,) row-wise cosine of two (N, D) batches of L2-normalised embeddings."""
    return (image_embeddings * text_embeddings).sum(-1)
