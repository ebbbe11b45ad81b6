"""Drawing a scene (see `scene.py`) into pixels with PIL; deterministic for a scene and a size."""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from pipeline.world.scene import Vocabulary

# Regions (x0, y0, x1, y1, as fractions of the side) where a group's shape centres may fall.
REGIONS = {
    "left": (0.05, 0.1, 0.45, 0.9),
    "right": (0.55, 0.1, 0.95, 0.9),
    "top": (0.1, 0.05, 0.9, 0.45),
    "bottom": (0.1, 0.55, 0.9, 0.95),
    "center": (0.25, 0.25, 0.75, 0.75),
}
# Where the first object of a relation sits, relative to the second: (dx, dy) in units of the side.
RELATION_OFFSETS = {"left_of": (-0.5, 0.0), "right_of": (0.5, 0.0), "above": (0.0, -0.5), "below": (0.0, 0.5)}


def _background(kind: str, size: int, rng: random.Random) -> Image.Image:
    """Low-saturation backgrounds, so shape colours stay unambiguous, each under its own soft light."""
    plain = _plain_background(kind, size, rng)
    shade = _lighting(size, rng)[:, :, None]
    return Image.fromarray((np.asarray(plain, dtype=np.float32) + shade).clip(0, 255).astype(np.uint8))


def _lighting(size: int, rng: random.Random, amplitude: float = 28.0) -> np.ndarray:
    """A smooth, grey brightness field unique to each image, as light falls across a photo. Without it the
    flat backgrounds make images that differ only in a small shape look alike to every perceptual hash."""
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(3):
        angle, period, phase = rng.uniform(0, math.pi), rng.uniform(0.6, 1.6), rng.uniform(0, 2 * math.pi)
        field += np.cos(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)
    return (amplitude / 3) * field


def _plain_background(kind: str, size: int, rng: random.Random) -> Image.Image:
    if kind == "grey":
        v = rng.randint(105, 150)
        return Image.new("RGB", (size, size), (v, v, v))
    if kind == "beige":
        return Image.new("RGB", (size, size), (222, 212, 188))
    if kind == "slate":
        return Image.new("RGB", (size, size), (68, 78, 92))
    np_rng = np.random.default_rng(rng.randrange(2**31))
    if kind == "gradient":
        top, bottom = rng.randint(60, 120), rng.randint(150, 215)
        column = np.linspace(top, bottom, size)[:, None, None]
        return Image.fromarray(np.broadcast_to(column, (size, size, 3)).astype(np.uint8))
    if kind == "noise":
        grey = np_rng.normal(128, 22, (size, size, 1)).clip(0, 255)
        tint = np_rng.normal(0, 4, (size, size, 3))
        return Image.fromarray((grey + tint).clip(0, 255).astype(np.uint8))
    raise ValueError(f"unknown background {kind!r}; expected one of grey, beige, slate, gradient, noise")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)


# How far a shape reaches from its centre, in units of its radius: a square's corners lie beyond the radius.
REACH = {"square": 0.85 * math.sqrt(2)}


def _group_centres(region, count: int, radius: float, size: int, rng: random.Random, reach: float = 1.0):
    """Centres of `count` shapes inside `region` that do not touch (a gap of at least 0.3 of their reach);
    shrinks the radius until they fit."""
    x0, y0, x1, y1 = (v * size for v in region)
    for _ in range(12):
        centres: list[tuple[float, float]] = []
        for _ in range(400):
            if len(centres) == count:
                return centres, radius
            cx = rng.uniform(x0 + radius, max(x0 + radius, x1 - radius))
            cy = rng.uniform(y0 + radius, max(y0 + radius, y1 - radius))
            if all(math.hypot(cx - a, cy - b) > 2.3 * reach * radius for a, b in centres):
                centres.append((cx, cy))
        radius *= 0.85
    raise RuntimeError(f"cannot place {count} shapes in region {region}")


def render(scene: dict, vocab: Vocabulary, size: int) -> Image.Image:
    rng = random.Random(scene["layout_seed"])
    image = _background(scene["background"], size, rng)
    draw = ImageDraw.Draw(image)
    radius = vocab.sizes[scene["size"]] * size
    if scene["kind"] == "group":
        centres, radius = _group_centres(
            REGIONS[scene["position"]], scene["count"], radius, size, rng, REACH.get(scene["shape"], 1.0)
        )
        for cx, cy in centres:
            _draw(draw, scene["shape"], vocab.colours[scene["colour"]], cx, cy, radius)
        return image
    radius = min(radius, 0.15 * size)
    dx, dy = RELATION_OFFSETS[scene["relation"]]
    # Midpoint of the pair jitters a little; the pair stays inside the frame.
    mx = size * (0.5 + rng.uniform(-0.05, 0.05))
    my = size * (0.5 + rng.uniform(-0.05, 0.05))
    first = (mx + dx * size / 2, my + dy * size / 2)
    second = (mx - dx * size / 2, my - dy * size / 2)
    _draw(draw, scene["shape"], vocab.colours[scene["colour"]], *first, radius)
    _draw(draw, scene["shape2"], vocab.colours[scene["colour2"]], *second, radius)
    return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
