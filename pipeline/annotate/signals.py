"""Per-sample signals, one small callable class each, run by Ray Data's `map_batches` on numpy batches.

`ShardAnnotator` reads shards into batches of samples and passes each batch through the signals in order;
every signal adds columns and keeps the rest. They run in one Ray actor so that a sample is decoded from its
tar once and no extra CPU is reserved per signal. A sample whose image cannot be read gets an `error` and null
signals, never a crash.
"""

from __future__ import annotations

import hashlib
import io
import json

import imagehash
import numpy as np
from PIL import Image

from pipeline.storage import Location
from pipeline.tar_io import iter_tar_samples
from pipeline.thumbnails import TRIM_SIZE, make_thumbnail

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLES_PER_BATCH = 256
HASH_SIDE = 36  # px: the image a hash is taken from is box-reduced to about this first (see dhash)


def _column(values, dtype=object) -> np.ndarray:
    out = np.empty(len(values), dtype=dtype)
    out[:] = values
    return out


class ShardAnnotator:
    """`{"shard": [tar names]}` → batches of `key, shard, shard_samples, image, caption, url, original_*`
    plus every signal's columns. A generator: batches of SAMPLES_PER_BATCH leave as they are done."""

    def __init__(self, input_url: str):
        self.input = Location(input_url)
        self.signals = [ImageGeometry(), ContentHash(), PerceptualSignals(), CaptionStats()]

    def __call__(self, batch: dict):
        for shard in batch["shard"]:
            for chunk in self.samples(str(shard)):
                for signal in self.signals:
                    chunk = signal(chunk)
                yield chunk

    def samples(self, shard: str):
        samples = list(self.read(shard))
        for start in range(0, len(samples), SAMPLES_PER_BATCH):
            chunk = samples[start : start + SAMPLES_PER_BATCH]
            yield {
                "key": _column([s["key"] for s in chunk]),
                "shard": _column([shard] * len(chunk)),
                "shard_samples": np.full(len(chunk), len(samples), dtype=np.int64),
                "image": _column([s["image"] for s in chunk]),
                "caption": _column([s["caption"] for s in chunk]),
                "url": _column([s["url"] for s in chunk]),
                "original_width": _column([s["original_width"] for s in chunk]),
                "original_height": _column([s["original_height"] for s in chunk]),
            }

    def read(self, shard: str):
        """Samples of one tar in webdataset's grouping: consecutive members that share a key."""
        with self.input.fs.open(self.input.path(shard), "rb") as f:
            for files in iter_tar_samples(f):
                yield self.sample(files)

    @staticmethod
    def sample(files: dict) -> dict:
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"])
            except ValueError:
                meta = {}
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        return {
            "key": files["__key__"],
            "image": image,
            "caption": files.get("txt", b"").decode("utf-8", "replace"),
            "url": meta.get("url"),
            "original_width": meta.get("original_width"),
            "original_height": meta.get("original_height"),
        }


class ContentHash:
    """sha256 of the stored image bytes: equal hashes, identical images (exact duplicates)."""

    def __call__(self, batch: dict) -> dict:
        batch["sha256"] = _column([hashlib.sha256(b).hexdigest() if b is not None else None for b in batch["image"]])
        return batch


class ImageGeometry:
    """Stored width and height from the image header (no decoding); original size and aspect ratio from the
    crawl's record when it has one, else the stored size. An image that will not open gets an `error`."""

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        width, height = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
        errors = []
        for i, data in enumerate(batch["image"]):
            error = None
            if data is None:
                error = "no image file in sample"
            else:
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        width[i], height[i] = image.size
                except Exception as err:  # PIL raises many types for bad bytes
                    error = f"unreadable image: {type(err).__name__}: {err}"
            errors.append(error)
        original_w = np.array([w if w is not None else s for w, s in zip(batch["original_width"], width)], np.int32)
        original_h = np.array([h if h is not None else s for h, s in zip(batch["original_height"], height)], np.int32)
        batch.update(
            width=width, height=height, original_width=original_w, original_height=original_h, error=_column(errors)
        )
        sides = np.stack([original_w, original_h]).astype(np.float32)
        batch["aspect_ratio"] = np.where(sides.min(0) > 0, sides.max(0) / np.maximum(sides.min(0), 1), np.nan).astype(
            np.float32
        )
        return batch


class PerceptualSignals:
    """From one reduced-scale decode of each image:
    - `dhash`, a 192-bit perceptual hash as 48 hex digits: imagehash's 8×8 difference hash of each YCbCr
      channel. Luminance alone sees layout but not colour; the two chroma channels tell a red shape from a
      blue one;
    - `thumbnail`, two 32-px views of the picture (pipeline/thumbnails.py), so that the filter can confirm
      near-duplicates and show them without opening an image: THUMBNAIL_BYTES bytes a row."""

    def __call__(self, batch: dict) -> dict:
        hashes, thumbnails, errors = [], [], list(batch["error"])
        for i, data in enumerate(batch["image"]):
            hash_, thumbnail = None, None
            if errors[i] is None:
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.draft("RGB", (2 * TRIM_SIZE, 2 * TRIM_SIZE))  # JPEG: decode at a reduced scale
                        rgb = image.convert("RGB")
                        hash_ = dhash(rgb)
                        thumbnail = make_thumbnail(rgb)
                except Exception as err:  # a good header over a broken body: only decoding finds it
                    hash_, thumbnail = None, None
                    errors[i] = f"unreadable image: {type(err).__name__}: {err}"
            hashes.append(hash_)
            thumbnails.append(thumbnail)
        batch["dhash"], batch["thumbnail"], batch["error"] = _column(hashes), _column(thumbnails), _column(errors)
        return batch


def dhash(rgb: Image.Image) -> str:
    """imagehash's 8×8 difference hash of each YCbCr channel, 48 hex digits, from a copy box-reduced by a whole
    factor to about HASH_SIDE px first. imagehash resizes to 9×8 with Lanczos, whose support at a 28× downscale
    made the three hashes of a 256 px image 0.93 ms of the readers' 3.28 ms a sample; from the reduced copy
    0.19 ms. The bits are those of a slightly different picture: an image and its copy are hashed alike."""
    factor = min(rgb.size) // HASH_SIDE
    small = rgb.reduce(factor) if factor > 1 else rgb
    return "".join(str(imagehash.dhash(channel)) for channel in small.convert("YCbCr").split())


class CaptionStats:
    def __call__(self, batch: dict) -> dict:
        captions = [c or "" for c in batch["caption"]]
        batch["caption_chars"] = np.array([len(c) for c in captions], np.int32)
        batch["caption_words"] = np.array([len(c.split()) for c in captions], np.int32)
        return batch
