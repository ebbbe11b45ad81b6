"""Image transforms for CLIP training and evaluation, with PIL and numpy (no torchvision).

`TrainTransform` is open_clip's: a random resized crop (scale 0.9–1 by default, since captions often name
positions and counts that a harsh crop would cut away), an optional flip (off: captions say "left"),
normalisation. It draws the crop's aspect ratio too, so it stretches or squashes the picture: fine for CLIP,
wrong for an image generator, which would learn the distortion. `ShortSideCrop` keeps the aspect ratio: it
resizes the short side to the output size and crops the square along the long side, at random or in the
centre (latent diffusion's training data, as Stable Diffusion's). `EvalTransform` is its centre crop, as CLIP
image processors do; the latent cache (`pipeline.encode`) uses it too, so cached and on-the-fly latent
diffusion data are cut alike. Randomness comes from a generator passed per call, so a sample's augmentation
depends only on its seed.
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


class ShortSideCrop:
    """Resize the short side to `image_size`, then a square crop of that side: centred, or with `random` at an
    offset drawn along the long side (the whole picture when it is square). One resample: the crop is a box in
    the source image."""

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, random: bool = False, flip: bool = False):
        self.size, self.mean, self.std = int(image_size), mean, std
        self.random, self.flip = bool(random), bool(flip)

    def crop_box(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[float, ...]:
        scale = self.size / min(width, height)
        if self.random and rng is not None:
            # Whole output pixels of slack along each side, rounded down so the box never leaves the picture.
            slack_w, slack_h = (max(0, math.floor(side * scale - self.size + 1e-6)) for side in (width, height))
            left, top = int(rng.integers(0, slack_w + 1)), int(rng.integers(0, slack_h + 1))
        else:
            w, h = max(self.size, round(width * scale)), max(self.size, round(height * scale))  # the resized image
            left, top = (w - self.size) // 2, (h - self.size) // 2
        return left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std)


class EvalTransform(ShortSideCrop):
    """The centre crop: CLIP's evaluation, every validation stream, and the latent cache."""

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__(image_size, mean, std, random=False, flip=False)
