"""Image transforms for CLIP training and evaluation, with PIL and numpy (no torchvision).

`TrainTransform` is open_clip's: a random resized crop (scale 0.9–1 by default, since captions often name
positions and counts that a harsh crop would cut away), an optional flip (off: captions say "left"),
normalisation. `EvalTransform` resizes the short side and centre-crops, as CLIP image processors do.
Randomness comes from a generator passed per call, so a sample's augmentation depends only on its seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from training.clip.model import CLIP_MEAN, CLIP_STD


def _to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, H, W)


class TrainTransform:
    def __init__(
        self, image_size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = False, mean=CLIP_MEAN, std=CLIP_STD
    ):
        self.size, self.scale, self.ratio, self.flip = int(image_size), tuple(scale), tuple(ratio), bool(flip)
        self.mean, self.std = mean, std

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A box of random area and aspect ratio inside the image (the centre if ten draws fail)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = image.convert("RGB")
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std)


class EvalTransform:
    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.mean, self.std = int(image_size), mean, std

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        scale = self.size / min(width, height)
        w, h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        left, top = (w - self.size) // 2, (h - self.size) // 2
        # One resample: the centre crop expressed as a box in the source image.
        box = (left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return _to_tensor(image, self.mean, self.std)
