"""Verify, resize and encode one downloaded image, with PIL.

The pixel cap is checked from the header, before a single pixel is decoded. For JPEG, decoding uses DCT
scaling (`Image.draft`) to the smallest scale still at least as large as the target, which is where most of
the speed over a full decode-then-resize comes from; the final resize is still a proper filter.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass
class Processed:
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    reason: str | None = None
    message: str | None = None
    exif: str | None = None


@dataclass
class ImageSettings:
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    max_pixels: int = 50_000_000
    min_image_size: int = 0
    max_aspect_ratio: float | None = None
    downscale_interpolation: str = "lanczos"
    upscale_interpolation: str = "bicubic"
    border_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in FORMATS:
            raise ValueError(f"encode_format={self.encode_format!r}; expected one of {', '.join(FORMATS)}")
        for name in (self.downscale_interpolation, self.upscale_interpolation):
            if name not in RESAMPLING:
                raise ValueError(f"interpolation {name!r}; expected one of {', '.join(RESAMPLING)}")


class ImageProcessor:
    """`processor(data) -> Processed`; never raises on bad bytes, it says why instead."""

    def __init__(self, settings: ImageSettings):
        self.s = settings

    def __call__(self, data: bytes) -> Processed:
        s = self.s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides, below
            try:
                image = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as err:
                return Processed(reason="too_many_pixels", message=str(err))
            except UnidentifiedImageError:
                return Processed(reason="not_an_image", message="not a decodable image")
            except Exception as err:  # a plugin choking on a malformed header
                return Processed(reason="corrupt_image", message=f"{type(err).__name__}: {err}")
            width, height = image.size
            if width * height > s.max_pixels:
                return Processed(reason="too_many_pixels", message=f"{width}x{height} over max_pixels {s.max_pixels}")
            if min(width, height) < s.min_image_size:
                return Processed(
                    reason="image_too_small", message=f"{width}x{height} under min_image_size {s.min_image_size}"
                )
            if s.max_aspect_ratio and max(width, height) / max(1, min(width, height)) > s.max_aspect_ratio:
                return Processed(
                    reason="aspect_ratio", message=f"{width}x{height} over max_aspect_ratio {s.max_aspect_ratio}"
                )
            source_format = image.format
            scale = self._scale(width, height)
            if scale < 1 and source_format == "JPEG":
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            try:
                exif = image.getexif()
                rotated = exif.get(0x0112, 1) not in (0, 1)  # EXIF orientation other than upright
                exif_json = exif_to_json(exif)
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                rgb = _to_rgb(image)
            except Exception as err:  # truncated or corrupt data
                return Processed(reason="corrupt_image", message=f"{type(err).__name__}: {err}")
        resized = self._resize(rgb, scale)
        # Re-encoding an untouched image in its own format only loses quality: keep the bytes (as img2dataset).
        if resized is image and scale == 1.0 and FORMATS[s.encode_format] == source_format and not rotated:
            return Processed(data, width, height, width, height, exif=exif_json)
        buffer = io.BytesIO()
        options = {"quality": s.encode_quality} if s.encode_format in ("jpg", "webp") else {}
        resized.save(buffer, format=FORMATS[s.encode_format], **options)
        return Processed(buffer.getvalue(), resized.width, resized.height, width, height, exif=exif_json)

    def _scale(self, width: int, height: int) -> float:
        """Factor from original to resized size (1 when the mode keeps the size)."""
        s = self.s
        if s.resize_mode == "no":
            return 1.0
        side = min(width, height) if s.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        if s.resize_only_if_bigger and side <= s.image_size:
            return 1.0
        return s.image_size / side

    def _resize(self, image: Image.Image, scale: float) -> Image.Image:
        """Returns `image` itself when there is nothing to do."""
        s = self.s
        if s.resize_mode == "no" or (scale == 1.0 and s.resize_only_if_bigger):
            return image
        # The scale was taken from the original size; draft() may already have shrunk `image`, so re-derive.
        w, h = image.size
        side = min(w, h) if s.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
        ratio = s.image_size / side
        size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        if size != (w, h):
            filter_name = s.downscale_interpolation if ratio < 1 else s.upscale_interpolation
            image = image.resize(size, RESAMPLING[filter_name])
        if s.resize_mode == "center_crop" and size[0] != size[1]:
            side = min(size)
            left, top = (size[0] - side) // 2, (size[1] - side) // 2
            image = image.crop((left, top, left + side, top + side))
        elif s.resize_mode == "border" and size[0] != size[1]:
            side = max(size)
            canvas = Image.new("RGB", (side, side), tuple(s.border_color))
            canvas.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
            image = canvas
        return image


def exif_to_json(exif: Image.Exif) -> str:
    """EXIF tags as a JSON object, named as img2dataset's `exif` field names them ("Image Make", "EXIF ...")."""
    tags = {f"Image {ExifTags.TAGS.get(k, k)}": v for k, v in exif.items() if k not in (0x8769, 0x8825)}
    tags.update({f"EXIF {ExifTags.TAGS.get(k, k)}": v for k, v in exif.get_ifd(0x8769).items()})
    tags.update({f"GPS {ExifTags.GPSTAGS.get(k, k)}": v for k, v in exif.get_ifd(0x8825).items()})
    return json.dumps({k: _printable(v) for k, v in tags.items() if not isinstance(v, bytes) or len(v) < 256})


def _printable(value) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency flattened onto white (as img2dataset does)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
