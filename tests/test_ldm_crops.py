"""Latent diffusion's data keeps the pictures' aspect ratio: the short side resized, a square cropped along the
long side (random in training, centred in validation and in the latent cache), where CLIP's random resized crop
stretches them. Measured on a 640×480 picture of a circle: a circle must come out round."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image, ImageDraw

from pipeline.storage import Location
from pipeline.tar_io import TarSampleWriter
from support import stage_config
from training.data.transforms import EvalTransform, ShortSideCrop, TrainTransform
from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD

SIZE = 32


def circle_picture(width: int = 640, height: int = 480, radius: int = 100) -> Image.Image:
    """A white disc in the middle of a black landscape picture; every crop below keeps it whole."""
    image = Image.new("RGB", (width, height), "black")
    cx, cy = width // 2, height // 2
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill="white")
    return image


def extents(pixels: torch.Tensor) -> tuple[float, float, float]:
    """(width, height, left edge) of the disc in a (3, S, S) tensor, in output pixels, from its bright mass."""
    mask = pixels.mean(0) > pixels.mean(0).min() + 0.5 * (pixels.mean(0).max() - pixels.mean(0).min())
    columns, rows = np.flatnonzero(mask.any(0).numpy()), np.flatnonzero(mask.any(1).numpy())
    return float(columns[-1] - columns[0] + 1), float(rows[-1] - rows[0] + 1), float(columns[0])


def stretch(pixels: torch.Tensor) -> float:
    width, height, _ = extents(pixels)
    return max(width, height) / min(width, height)


def test_short_side_crop_keeps_circles_round_where_clips_crop_stretches_them():
    picture = circle_picture()
    random_crop = ShortSideCrop(SIZE, SYMMETRIC_MEAN, SYMMETRIC_STD, random=True)
    clip_crop = TrainTransform(SIZE, scale=(0.9, 1.0), mean=SYMMETRIC_MEAN, std=SYMMETRIC_STD)
    ours, clips = [], []
    for seed in range(40):
        ours.append(random_crop(picture, np.random.default_rng(seed)))
        clips.append(clip_crop(picture, np.random.default_rng(seed)))
    assert max(stretch(p) for p in ours) <= 1.1  # round, up to a pixel of rasterisation
    stretched = sum(stretch(p) > 1.1 for p in clips) / len(clips)
    print(f"CLIP's random resized crop stretched the circle by > 10% in {stretched:.0%} of 40 draws")
    assert stretched > 0.3  # why latent diffusion must not use it (CLIP keeps it: its behaviour is unchanged)

    # Every random crop has the scale of the centre crop (the disc is as wide), only its position differs,
    # and only along the long side (x here).
    centre = extents(EvalTransform(SIZE, SYMMETRIC_MEAN, SYMMETRIC_STD)(picture))
    lefts = set()
    for pixels in ours:
        width, height, left = extents(pixels)
        assert width == pytest.approx(centre[0], abs=1) and height == pytest.approx(centre[1], abs=1)
        lefts.add(left)
    assert len(lefts) > 3


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (100, 37)])
def test_crop_box_is_a_square_of_the_short_side_inside_the_picture(size):
    width, height = size
    transform = ShortSideCrop(SIZE, random=True)
    boxes = [transform.crop_box(width, height, np.random.default_rng(seed)) for seed in range(50)]
    short = min(width, height)
    for left, top, right, bottom in boxes:
        assert right - left == pytest.approx(short, rel=0.01) and bottom - top == pytest.approx(short, rel=0.01)
        assert -1e-6 <= left and right <= width + 1e-6 and -1e-6 <= top and bottom <= height + 1e-6
    if width == height:
        assert len(set(boxes)) == 1  # a square picture is taken whole
    # The centred box, and the crop without a generator (validation, the latent cache), is EvalTransform's.
    assert ShortSideCrop(SIZE).crop_box(width, height, None) == transform.crop_box(width, height, None)


def test_centre_crop_is_exactly_the_latent_caches_transform():
    picture = circle_picture(100, 37)
    cached = EvalTransform(SIZE, SYMMETRIC_MEAN, SYMMETRIC_STD)(picture)  # what pipeline.encode stores latents of
    assert torch.equal(ShortSideCrop(SIZE, SYMMETRIC_MEAN, SYMMETRIC_STD)(picture, np.random.default_rng(0)), cached)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    circle_picture().save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _circle_shards(folder) -> str:
    location = Location(str(folder))
    location.makedirs()
    writer = TarSampleWriter(location, "00000.tar")
    for i in range(8):
        writer.add({"__key__": f"{i:09d}", "jpg": _jpeg(), "txt": b"a white circle"})
    writer.close()
    return str(folder)


def test_ldm_task_trains_on_round_circles_and_clip_keeps_its_random_resized_crop(tmp_path):
    shards = _circle_shards(tmp_path / "shards")
    small = [f"data.path={shards}", "data.batch_size=4", "data.num_workers=0", "output=o"]
    ldm = instantiate(stage_config("train", "task=ldm", "vae=v", "clip=c", *small).data)
    ldm.attach(None, SIZE, None, SYMMETRIC_MEAN, SYMMETRIC_STD)
    stream = ldm.stream(train=True)
    assert isinstance(stream.transform, ShortSideCrop) and stream.transform.random
    assert all(stretch(p) <= 1.1 for p in next(iter(stream))["pixel_values"])
    centre = EvalTransform(SIZE, SYMMETRIC_MEAN, SYMMETRIC_STD)(Image.open(io.BytesIO(_jpeg())))
    assert torch.equal(next(iter(ldm.preview(1)))["pixel_values"][0], centre)  # validation: the cache's crop

    clip = instantiate(stage_config("train", "task=clip", *small).data)
    clip.attach(None, SIZE, None)
    assert type(clip.stream(train=True).transform) is TrainTransform  # CLIP's data is as it was
