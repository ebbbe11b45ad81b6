"""Small thumbnails that annotate stores once per image, so that the filter can confirm a near-duplicate (and
show it) without opening an image.

A thumbnail is two views of the picture, each 32×32 luma plus 16×16 Cb and Cr (4:2:0) and the view's aspect
ratio, in THUMBNAIL_BYTES bytes:
- the *frame*: the image less one uniform band per side (the crawl's border padding, a letterbox);
- the *content*: the frame less up to two more uniform bands (a plain background, a frame around a button).
Both are squashed to a square, so a crop of the picture is a sub-rectangle of the other in normalised
coordinates whatever the aspect ratio. Two views, because a crop or a brightness change can turn a plain
background into no background (or back): one of the four pairings of views shows the relation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 32  # luma; chroma is half that
VIEWS = ("frame", "content")
LUMA_BYTES, CHROMA_BYTES = SIDE * SIDE, (SIDE // 2) ** 2
VIEW_BYTES = LUMA_BYTES + 2 * CHROMA_BYTES + 2  # + the view's aspect ratio as float16
THUMBNAIL_BYTES = len(VIEWS) * VIEW_BYTES

UNIFORM_TOLERANCE = 12  # grey levels: JPEG noise on a flat band stays within it, a faint shape does not
UNIFORM_SHARE = 0.98  # a band line may have this share of its pixels off its colour (specks, anti-aliasing)
TRIM_SIZE = 96  # bands are found on a copy this size: a box to within 1% of the side is enough
BACKGROUND_PASSES = 2


BAND_CHUNK = 4  # lines judged first, doubling after: most pictures stop within a few, the rest is never read


def _band_lines(lines: np.ndarray, first_colour: np.ndarray) -> np.ndarray:
    """Which lines (L, n, 3) are near-uniform and of `first_colour`."""
    colour = np.median(lines, axis=1)
    uniform = (np.abs(lines - colour[:, None]).max(-1) <= UNIFORM_TOLERANCE).mean(1) >= UNIFORM_SHARE
    return uniform & (np.abs(colour - first_colour).max(-1) <= UNIFORM_TOLERANCE)


def _leading_band(lines: np.ndarray) -> int:
    """How many leading lines (L, n, 3) are near-uniform and of the first line's colour. Judged a chunk of
    lines at a time (doubling), stopping at the first line that is not: a line's verdict depends on itself and the
    first line only, so the count is the same as judging all at once, at a fraction of the medians."""
    first_colour = np.median(lines[0], axis=0)
    start, chunk = 0, BAND_CHUNK
    while start < len(lines):
        band = _band_lines(lines[start : start + chunk], first_colour)
        if not band.all():
            return start + int(np.argmin(band))
        start, chunk = start + chunk, 2 * chunk
    return len(lines)


def _strip(pixels: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    region = pixels[y0:y1, x0:x1]
    columns = region.transpose(1, 0, 2)
    top, bottom = _leading_band(region), _leading_band(region[::-1])
    left, right = _leading_band(columns), _leading_band(columns[::-1])
    if top + bottom >= (y1 - y0) - 2 or left + right >= (x1 - x0) - 2:
        return box  # a uniform picture (or a thin line in one): nothing to strip
    return x0 + left, y0 + top, x1 - right, y1 - bottom


def view_boxes(image: Image.Image) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(frame, content) boxes in `image`'s pixels."""
    scale = max(image.size) / TRIM_SIZE
    small = (
        image
        if scale <= 1
        else image.resize((max(1, round(image.width / scale)), max(1, round(image.height / scale))), Image.BOX)
    )
    pixels = np.asarray(small, np.int16)
    full = (0, 0, small.width, small.height)
    frame = content = _strip(pixels, full)
    for _ in range(BACKGROUND_PASSES):
        if min(content[2] - content[0], content[3] - content[1]) < 4:
            break
        inner = _strip(pixels, content)
        if inner == content:
            break
        content = inner
    sx, sy = image.width / small.width, image.height / small.height
    return tuple(
        (
            round(b[0] * sx),
            round(b[1] * sy),
            max(round(b[2] * sx), round(b[0] * sx) + 1),
            max(round(b[3] * sy), round(b[1] * sy) + 1),
        )
        for b in (frame, content)
    )


def _view(image: Image.Image, box) -> bytes:
    region = image.crop(box)
    square = region.resize((SIDE, SIDE), Image.BOX if min(region.size) >= SIDE else Image.BILINEAR)
    luma, cb, cr = square.convert("YCbCr").split()
    half = (SIDE // 2, SIDE // 2)
    aspect = np.float16(region.width / region.height).tobytes()
    return luma.tobytes() + cb.resize(half, Image.BOX).tobytes() + cr.resize(half, Image.BOX).tobytes() + aspect


def make_thumbnail(image: Image.Image) -> bytes:
    """THUMBNAIL_BYTES bytes for an RGB image; draft-decoded JPEGs are fine (the views are 32 px)."""
    image = image.convert("RGB")
    return b"".join(_view(image, box) for box in view_boxes(image))


class Thumbnails:
    """Decoded thumbnails of N rows: `luma` (N, 2, 32, 32) and `chroma` (N, 2, 2, 16, 16) float32, `aspect`
    (N, 2); view 0 is the frame, view 1 the content."""

    def __init__(self, luma: np.ndarray, chroma: np.ndarray, aspect: np.ndarray):
        self.luma, self.chroma, self.aspect = luma, chroma, aspect

    def __len__(self) -> int:
        return len(self.luma)

    def take(self, rows: np.ndarray) -> Thumbnails:
        return Thumbnails(self.luma[rows], self.chroma[rows], self.aspect[rows])

    @classmethod
    def decode(cls, blobs) -> Thumbnails:
        """From a sequence of THUMBNAIL_BYTES-long bytes (None or a wrong length: an all-zero thumbnail)."""
        raw = np.zeros((len(blobs), THUMBNAIL_BYTES), np.uint8)
        for i, blob in enumerate(blobs):
            if isinstance(blob, bytes | bytearray) and len(blob) == THUMBNAIL_BYTES:
                raw[i] = np.frombuffer(blob, np.uint8)
        return cls.from_array(raw)

    @classmethod
    def from_array(cls, raw: np.ndarray) -> Thumbnails:
        """From an (N, THUMBNAIL_BYTES) uint8 array."""
        views = raw.reshape(len(raw), len(VIEWS), VIEW_BYTES)
        luma = views[:, :, :LUMA_BYTES].reshape(len(raw), len(VIEWS), SIDE, SIDE).astype(np.float32)
        chroma = views[:, :, LUMA_BYTES : LUMA_BYTES + 2 * CHROMA_BYTES]
        chroma = chroma.reshape(len(raw), len(VIEWS), 2, SIDE // 2, SIDE // 2).astype(np.float32)
        aspect = (
            np.ascontiguousarray(views[:, :, -2:]).view(np.float16).reshape(len(raw), len(VIEWS)).astype(np.float32)
        )
        return cls(luma, chroma, aspect)


def thumbnail_image(blob: bytes, view: int = 0, size: int = 96) -> Image.Image:
    """One view of a stored thumbnail as an RGB picture `size` px square, for the report's pair grids."""
    t = Thumbnails.decode([blob])
    luma = Image.fromarray(t.luma[0, view].astype(np.uint8))
    cb, cr = (Image.fromarray(c.astype(np.uint8)).resize(luma.size, Image.BILINEAR) for c in t.chroma[0, view])
    return Image.merge("YCbCr", (luma, cb, cr)).convert("RGB").resize((size, size), Image.BICUBIC)
