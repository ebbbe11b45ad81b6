"""Verify, resize and encode one downloaded image, with PIL.

Everything that can be known from the header is checked before a single pixel is decoded: the input pixel cap,
and, because the output size is a pure function of the input size and the settings (`ImageProcessor.geometry`),
the output pixel cap and the encoder's per-side limit too. A thin strip (1×100000) would otherwise ask for a
256×25,600,000 resize in keep_ratio, or an intermediate of that size before a center crop.

For JPEG, decoding uses DCT scaling (`Image.draft`) to the smallest scale still at least as large as the target,
which is where most of the speed over a full decode-then-resize comes from; the final resize is still a proper
filter, after a box reduction by whole factors wherever at least 2× would remain (`reducing_gap`: what keeps
large PNG and WebP sources, which cannot be decoded reduced, from paying a full-size Lanczos pass).
center_crop resizes only the crop (`Image.resize(box=...)`), so no intermediate larger than the output exists,
and EXIF rotation is applied to the small output rather than to the decoded original.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
ENCODER_MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383, "PNG": 2**31 - 1}
DEFAULT_DECODE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
REASONS = (
    "not_an_image",
    "format_not_allowed",
    "corrupt_image",
    "too_many_pixels",
    "image_too_small",
    "aspect_ratio",
    "encoder_limit",
    "encode_failed",
    "internal_error",
)
# EXIF orientation → the transpose that makes the image upright (as ImageOps.exif_transpose).
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Formats PIL opens with another format's plugin: it has no opener of its own (a KeyError if named to open()).
OPENED_BY = {"MPO": "JPEG"}


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
    # Downscales by whole factors with a box filter first while the rest stays at least this factor, then
    # resamples with the filter (Pillow's reducing_gap). At 2.0: 2× faster on 1024–2048 px PNG/WebP sources,
    # at most 0.1 dB PSNR from one Lanczos pass on real pictures (bench/crawl_paths.py); None: one pass.
    reducing_gap: float | None = 2.0
    border_color: tuple[int, int, int] = (255, 255, 255)
    decode_formats: tuple[str, ...] = DEFAULT_DECODE_FORMATS

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in FORMATS:
            raise ValueError(f"encode_format={self.encode_format!r}; expected one of {', '.join(FORMATS)}")
        if self.reducing_gap is not None and not self.reducing_gap >= 1:
            raise ValueError(f"reducing_gap={self.reducing_gap!r}; expected a number ≥ 1, or null")
        for name in (self.downscale_interpolation, self.upscale_interpolation):
            if name not in RESAMPLING:
                raise ValueError(f"interpolation {name!r}; expected one of {', '.join(RESAMPLING)}")
        if isinstance(self.decode_formats, str) or not self.decode_formats:
            raise ValueError(f"decode_formats={self.decode_formats!r}; expected a non-empty list of PIL format names")
        Image.init()  # loads every plugin, so that OPEN names all the formats this PIL can decode
        for name in self.decode_formats:
            if not isinstance(name, str) or (name.upper() not in Image.OPEN and name.upper() not in OPENED_BY):
                raise ValueError(f"decode_formats: {name!r} is not a format PIL can open")
        self.decode_formats = tuple(name.upper() for name in self.decode_formats)


class Geometry(NamedTuple):
    """Where the pixels go, in the stored (pre-EXIF-rotation) frame of the source."""

    box: tuple[float, float, float, float] | None  # the source region that is resized; None: all of it
    resize: tuple[int, int] | None  # the size that region is resized to; None: no resize
    output: tuple[int, int]  # the final size, after border padding


class _Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class ImageProcessor:
    """`processor(data) -> Processed`; never raises, whatever the bytes: a failure is a `reason` (REASONS)."""

    def __init__(self, settings: ImageSettings):
        self.s = settings
        self._openers = tuple(dict.fromkeys(OPENED_BY.get(name, name) for name in settings.decode_formats))

    def __call__(self, data: bytes) -> Processed:
        try:
            with warnings.catch_warnings():
                # Our own caps decide (below), and PIL's warnings about odd files say nothing a reason doesn't.
                warnings.simplefilter("ignore")
                return self._process(data)
        except _Refused as refused:
            return Processed(reason=refused.reason, message=refused.message)
        except Exception as err:  # a bug or a library failure: this image, never the crawl
            return Processed(reason="internal_error", message=f"{type(err).__name__}: {err}")

    # -- geometry: a pure function of the source size and the settings ---------------------------------
    def geometry(self, width: int, height: int) -> Geometry:
        s = self.s
        if s.resize_mode == "no":
            return Geometry(None, None, (width, height))
        side = min(width, height) if s.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        if s.resize_only_if_bigger and side <= s.image_size:
            return Geometry(None, None, (width, height))  # img2dataset: neither resized, nor cropped, nor padded
        if s.resize_mode == "center_crop":  # crop in source coordinates, then resize only the crop
            left, top = (width - side) // 2, (height - side) // 2
            box = None if width == height else (left, top, left + side, top + side)
            resize = None if side == s.image_size else (s.image_size, s.image_size)
            return Geometry(box, resize, (s.image_size, s.image_size))
        ratio = s.image_size / side
        resize = (max(1, round(width * ratio)), max(1, round(height * ratio)))  # never a side of 0
        output = (max(resize), max(resize)) if s.resize_mode == "border" else resize
        return Geometry(None, None if resize == (width, height) else resize, output)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The encoded size for a width × height source (before EXIF rotation, which may swap the two)."""
        return self.geometry(width, height).output

    def resize_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the source (or, in center_crop, its crop) is resized to, before any border padding."""
        geometry = self.geometry(width, height)
        if geometry.resize:
            return geometry.resize
        box = geometry.box or (0, 0, width, height)
        return round(box[2] - box[0]), round(box[3] - box[1])

    # -- the pipeline ----------------------------------------------------------------------------------
    def _process(self, data: bytes) -> Processed:
        s = self.s
        image = self._open(data)
        width, height = image.size
        if width * height > s.max_pixels:
            raise _Refused("too_many_pixels", f"{width}x{height} over max_pixels {s.max_pixels}")
        if min(width, height) < s.min_image_size:
            raise _Refused("image_too_small", f"{width}x{height} under min_image_size {s.min_image_size}")
        if s.max_aspect_ratio and max(width, height) / max(1, min(width, height)) > s.max_aspect_ratio:
            raise _Refused("aspect_ratio", f"{width}x{height} over max_aspect_ratio {s.max_aspect_ratio}")
        box, resize, output = self.geometry(width, height)
        if output[0] * output[1] > s.max_pixels:
            raise _Refused("too_many_pixels", f"output {output[0]}x{output[1]} over max_pixels {s.max_pixels}")
        target = FORMATS[s.encode_format]
        untouched = resize is None and box is None and output == (width, height) and image.format == target
        if not untouched:
            self._check_encoder(output, target)
        if resize and image.format in ("JPEG", "MPO"):
            scale = min(resize[0] / width, resize[1] / height) if box is None else resize[0] / (box[2] - box[0])
            if scale < 1:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            exif = image.getexif()
            orientation = ORIENTATION.get(exif.get(0x0112, 1))
            exif_json = exif_to_json(exif)
            image = decode_pixels(image, data)
        except Image.DecompressionBombError as err:
            raise _Refused("too_many_pixels", str(err)) from err
        except MemoryError:
            raise
        except Exception as err:  # truncated or corrupt data
            raise _Refused("corrupt_image", f"{type(err).__name__}: {err}") from err
        if untouched and orientation is None:
            # Re-encoding an untouched image in its own format only loses quality: keep the bytes (as img2dataset).
            return Processed(data, width, height, width, height, exif=exif_json)
        if untouched:
            self._check_encoder(output, target)
        out = _to_8bit(image)
        if resize:
            if box is not None and image.size != (width, height):  # draft() shrank the decoded image
                fx, fy = image.width / width, image.height / height
                box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            upscale = resize[0] * resize[1] > out.width * out.height if box is None else resize[0] > box[2] - box[0]
            filter_name = s.upscale_interpolation if upscale else s.downscale_interpolation
            gap = None if upscale else s.reducing_gap
            out = out.resize(resize, RESAMPLING[filter_name], box=box, reducing_gap=gap)
        elif box is not None:  # center_crop of an image whose short side is already image_size
            out = out.crop(box)
        if out.mode != "RGB":
            out = out.convert("RGB")
        if output != out.size:  # border
            canvas = Image.new("RGB", output, tuple(s.border_color))
            canvas.paste(out, ((output[0] - out.width) // 2, (output[1] - out.height) // 2))
            out = canvas
        if orientation is not None:
            out = out.transpose(orientation)
        return Processed(self._encode(out, target), out.width, out.height, width, height, exif=exif_json)

    def _open(self, data: bytes) -> Image.Image:
        """Opens (header only) with the allowed formats' plugins; on failure, says whether another PIL knows it."""
        try:
            image = Image.open(io.BytesIO(data), formats=self._openers)
            if image.format in self.s.decode_formats:
                return image
            other = image.format  # say MPO, opened by the JPEG plugin when only JPEG is allowed
        except Image.DecompressionBombError as err:
            raise _Refused("too_many_pixels", str(err)) from err
        except UnidentifiedImageError:
            other = None
        except Exception as err:  # a plugin choking on a malformed header
            raise _Refused("corrupt_image", f"{type(err).__name__}: {err}") from err
        if other is None:  # only on this failure path: identify with all the plugins (reads the header only)
            try:
                other = Image.open(io.BytesIO(data)).format
            except Exception:
                other = None
        if other and other not in self.s.decode_formats:
            allowed = ", ".join(self.s.decode_formats)
            raise _Refused("format_not_allowed", f"{other} image; decode_formats allows {allowed}")
        raise _Refused("not_an_image", "not a decodable image")

    @staticmethod
    def _check_encoder(size: tuple[int, int], target: str) -> None:
        if max(size) > ENCODER_MAX_SIDE[target]:
            limit = ENCODER_MAX_SIDE[target]
            raise _Refused("encoder_limit", f"output {size[0]}x{size[1]}: {target} allows at most {limit} px a side")

    def _encode(self, image: Image.Image, target: str) -> bytes:
        buffer = io.BytesIO()
        options = {"quality": self.s.encode_quality} if target in ("JPEG", "WEBP") else {}
        try:
            image.save(buffer, format=target, **options)
        except MemoryError:
            raise
        except Exception as err:
            raise _Refused("encode_failed", f"{target}: {type(err).__name__}: {err}") from err
        return buffer.getvalue()


def decode_pixels(image: Image.Image, data: bytes) -> Image.Image:
    """The image with its pixels loaded. A still WebP without alpha is decoded by OpenCV's libwebp: the same
    pixels as PIL's, in under half the time at 1024–2048 px (PIL decodes every WebP through libwebp's animation
    decoder onto an RGBA canvas; bench/crawl_paths.py). Everything else, and every WebP with alpha or frames,
    stays with PIL. Orientation is ours to apply (to the small output), so OpenCV must not."""
    if image.format == "WEBP" and image.mode == "RGB" and not getattr(image, "is_animated", False):
        import cv2  # imported on the first WebP only: 0.4 s that a crawl of JPEGs need not pay

        flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if pixels is None or pixels.shape[:2] != (image.height, image.width):
            raise ValueError("libwebp could not decode the whole image")
        return Image.fromarray(pixels)
    image.load()
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


def _to_8bit(image: Image.Image) -> Image.Image:
    """L or RGB, 8 bits a channel, transparency flattened onto white (as img2dataset does).

    convert("RGB") clips the 16- and 32-bit modes at 255, so a mid-grey 16-bit PNG would come out white:
    those are scaled (>>8, the high byte) or, for float, clipped, with numpy.
    """
    mode, transparency = image.mode, image.info.get("transparency")
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image)
        if mode == "F":
            grey = np.clip(np.nan_to_num(values), 0, 255).astype(np.uint8)
        elif values.dtype.itemsize == 2:  # unsigned 16-bit: the high byte is already in range
            grey = (values >> 8).astype(np.uint8)
        else:  # mode I holds 16-bit data as int32; anything outside 0..65535 is clipped
            grey = np.clip(values >> 8, 0, 255).astype(np.uint8)
        if isinstance(transparency, int):  # tRNS: one grey value is transparent
            grey[values == transparency] = 255
        return Image.fromarray(grey)
    if mode in ALPHA_MODES or (transparency is not None and mode in ("P", "L", "RGB", "1")):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")  # resizing one channel is a third of the work; RGB comes after
    return image.convert("RGB")
