"""ImageProcessor on odd inputs: strips, encoder limits, 16-bit data, disallowed formats, one error boundary."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipeline.crawl import image as image_module
from pipeline.crawl.image import REASONS, ImageProcessor, ImageSettings, _to_8bit
from pipeline.world.world import declare_size

JpegPlugin = JpegImagePlugin.JpegImageFile


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(w, h, value=128) -> bytes:
    return _encode(Image.new("L", (w, h), value), "PNG")


def _grey16(w=300, h=200, value=32768) -> bytes:
    return _encode(Image.fromarray(np.full((h, w), value, np.uint16)), "PNG")


def _jpeg(w, h, colour=(200, 30, 30)) -> bytes:
    return _encode(Image.new("RGB", (w, h), colour), "JPEG", quality=90)


IMAGES = {
    "1x300": lambda: _png(1, 300),
    "300x1": lambda: _png(300, 1),
    "1x100000": lambda: _png(1, 100_000),
    "70000x4": lambda: _png(70_000, 4),
    "20000x10": lambda: _png(20_000, 10),
    "grey16": _grey16,
    "jpeg": lambda: _jpeg(300, 200),
}
SOURCE_SIZE = {
    "1x300": (1, 300),
    "300x1": (300, 1),
    "1x100000": (1, 100_000),
    "70000x4": (70_000, 4),
    "20000x10": (20_000, 10),
    "grey16": (300, 200),
    "jpeg": (300, 200),
}
SQUARE = (256, 256)
# resize mode → image → the expected result: a size, a reason, or {encode format: size or reason}.
EXPECTED = {
    "no": {
        "1x300": (1, 300),
        "300x1": (300, 1),
        "1x100000": {"jpg": "encoder_limit", "webp": "encoder_limit", "png": (1, 100_000)},  # png: bytes kept
        "70000x4": {"jpg": "encoder_limit", "webp": "encoder_limit", "png": (70_000, 4)},
        "20000x10": {"jpg": (20_000, 10), "webp": "encoder_limit", "png": (20_000, 10)},
        "grey16": (300, 200),
        "jpeg": (300, 200),
    },
    "border": dict.fromkeys(IMAGES, SQUARE),
    "center_crop": dict.fromkeys(IMAGES, SQUARE),  # 1x100000: the 1x1 centre, upscaled
    "keep_ratio": {
        "1x300": {"jpg": "encoder_limit", "webp": "encoder_limit", "png": (256, 76_800)},
        "300x1": {"jpg": "encoder_limit", "webp": "encoder_limit", "png": (76_800, 256)},
        "1x100000": "too_many_pixels",  # 256 x 25,600,000
        "70000x4": "too_many_pixels",
        "20000x10": "too_many_pixels",
        "grey16": (384, 256),
        "jpeg": (384, 256),
    },
    "keep_ratio_largest": {
        "1x300": (1, 256),
        "300x1": (256, 1),
        "1x100000": (1, 256),
        "70000x4": (256, 1),  # 4 * 256 / 70000 rounds to 0: a side is never below 1
        "20000x10": (256, 1),
        "grey16": (256, 171),
        "jpeg": (256, 171),
    },
}
CASES = [(mode, name, fmt) for mode in EXPECTED for name in IMAGES for fmt in ("jpg", "webp", "png")]


@pytest.fixture(scope="module")
def images():
    return {name: make() for name, make in IMAGES.items()}


@pytest.mark.parametrize("mode, name, fmt", CASES, ids=["-".join(case) for case in CASES])
def test_every_mode_on_odd_images(mode, name, fmt, images, monkeypatch):
    expected = EXPECTED[mode][name]
    if isinstance(expected, dict):
        expected = expected[fmt]
    resizes = []
    original_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        resizes.append(size)
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    processor = ImageProcessor(ImageSettings(resize_mode=mode, encode_format=fmt))
    out = processor(images[name])  # must not raise
    if isinstance(expected, str):
        assert (out.reason, out.data) == (expected, None), out.message
        assert resizes == []  # refused from the header, before any pixel work
    else:
        assert out.reason is None, out.message
        assert (out.width, out.height) == expected
        assert Image.open(io.BytesIO(out.data)).size == expected
        assert (out.original_width, out.original_height) == SOURCE_SIZE[name]
        assert processor.output_size(*SOURCE_SIZE[name]) == expected
        # No intermediate larger than the output: center_crop resizes its crop only.
        assert all(w * h <= expected[0] * expected[1] for w, h in resizes)


def test_geometry_is_exposed():
    processor = ImageProcessor(ImageSettings(resize_mode="center_crop"))
    assert processor.geometry(1, 100_000) == ((0, 49_999, 1, 50_000), (256, 256), (256, 256))
    assert processor.resize_size(400, 200) == (256, 256)
    border = ImageProcessor(ImageSettings(resize_mode="border", image_size=64))
    assert border.resize_size(400, 200) == (64, 32)
    assert border.output_size(400, 200) == (64, 64)
    keep = ImageProcessor(ImageSettings(resize_mode="keep_ratio"))
    assert keep.output_size(1, 100_000) == (256, 25_600_000)
    assert keep.geometry(256, 512) == (None, None, (256, 512))  # already the size: no resize
    small = ImageProcessor(ImageSettings(resize_mode="border", resize_only_if_bigger=True))
    assert small.output_size(100, 50) == (100, 50)


def test_untouched_png_strip_keeps_its_bytes():
    data = _png(70_000, 4)
    out = ImageProcessor(ImageSettings(resize_mode="no", encode_format="png"))(data)
    assert out.data == data


def test_output_pixel_cap():
    processor = ImageProcessor(ImageSettings(resize_mode="keep_ratio", encode_format="png", max_pixels=1_000_000))
    out = processor(_png(1, 300))  # 300 input pixels, 256 x 76,800 output pixels
    assert out.reason == "too_many_pixels"
    assert "256x76800" in out.message


def test_strips_allocate_little():
    """In a fresh process, so that the peak RSS before is the baseline: a 256 x 25.6M resize would be ~20 GB."""
    code = textwrap.dedent(
        """
        import io, resource
        from PIL import Image
        from pipeline.crawl.image import ImageProcessor, ImageSettings
        buffer = io.BytesIO()
        Image.new("L", (1, 100_000), 128).save(buffer, "PNG")
        strip = buffer.getvalue()
        ImageProcessor(ImageSettings())(strip)  # warm up: plugins and buffers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        crop = ImageProcessor(ImageSettings(resize_mode="center_crop"))(strip)
        keep = ImageProcessor(ImageSettings(resize_mode="keep_ratio"))(strip)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(crop.width, crop.height, keep.reason, (after - before) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    width, height, reason, grown_mb = result.stdout.split()
    assert (int(width), int(height), reason) == (256, 256, "too_many_pixels")
    assert int(grown_mb) < 200


def test_16_bit_grey_is_scaled_not_clipped():
    for mode, fmt in (("no", "jpg"), ("keep_ratio", "png"), ("center_crop", "webp")):  # no+png: bytes kept
        out = ImageProcessor(ImageSettings(resize_mode=mode, encode_format=fmt))(_grey16())
        pixels = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
        assert abs(pixels.mean() - 128) <= 2 and pixels.min() >= 126 and pixels.max() <= 130


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_every_16_bit_mode_scales(mode):
    out = _to_8bit(Image.new(mode, (4, 3), 32768))
    assert out.mode == "L" and np.asarray(out).tolist() == [[128] * 4] * 3


def test_float_is_clipped():
    values = np.array([[-5.0, 100.0, 300.0]], np.float32)
    assert np.asarray(_to_8bit(Image.fromarray(values, "F"))).tolist() == [[0, 100, 255]]


def test_16_bit_transparency_is_flattened_on_white():
    values = np.full((10, 10), 8192, np.uint16)
    values[:, 5:] = 1000  # the transparent grey
    data = _encode(Image.fromarray(values), "PNG", transparency=1000)
    out = ImageProcessor(ImageSettings(image_size=20, resize_mode="keep_ratio", encode_format="png"))(data)
    pixels = np.asarray(Image.open(io.BytesIO(out.data)).convert("L"))
    assert pixels.shape == (20, 20)
    # away from the edge, where bicubic upscaling rings
    assert pixels[:, :6].tolist() == [[32] * 6] * 20 and pixels[:, 14:].tolist() == [[255] * 6] * 20


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_disallowed_format_is_named(fmt, monkeypatch):
    data = _encode(Image.new("RGB", (16, 16), (9, 9, 9)), fmt)
    out = ImageProcessor(ImageSettings())(data)
    assert out.reason == "format_not_allowed"
    assert out.message.startswith(f"{fmt} image")
    allowed = ImageProcessor(ImageSettings(decode_formats=[fmt.lower(), "PNG"]))(data)
    assert allowed.reason is None and (allowed.width, allowed.height) == (256, 256)


def test_mpo_needs_its_own_name():
    data = _encode(Image.new("RGB", (32, 32)), "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32))])
    assert ImageProcessor(ImageSettings())(data).reason is None
    out = ImageProcessor(ImageSettings(decode_formats=("JPEG",)))(data)
    assert out.reason == "format_not_allowed" and out.message.startswith("MPO image")


def test_bad_decode_formats_are_named():
    with pytest.raises(ValueError, match="'NOPE'"):
        ImageSettings(decode_formats=("JPEG", "NOPE"))
    with pytest.raises(ValueError, match="'PDF'"):  # PIL writes PDF but cannot open it
        ImageSettings(decode_formats=("PDF",))
    with pytest.raises(ValueError, match="decode_formats"):
        ImageSettings(decode_formats="JPEG")
    assert ImageSettings(decode_formats=["png", "Jpeg"]).decode_formats == ("PNG", "JPEG")


def test_one_open_and_one_decode_on_the_jpeg_path(monkeypatch):
    opens, drafts = [], []
    original_open, original_draft = Image.open, JpegPlugin.draft

    def open_spy(*args, **kwargs):
        opens.append(kwargs.get("formats"))
        return original_open(*args, **kwargs)

    def draft_spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(Image, "open", open_spy)
    monkeypatch.setattr(JpegPlugin, "draft", draft_spy)
    out = ImageProcessor(ImageSettings(resize_mode="keep_ratio"))(_jpeg(2000, 1500))
    assert (out.width, out.height) == (341, 256)
    assert len(opens) == 1
    assert drafts == [(500, 375)]  # DCT scaling by 4 still happens
    opens.clear()
    ImageProcessor(ImageSettings())(_encode(Image.new("RGB", (8, 8)), "ICO"))
    assert len(opens) == 2  # the second, unrestricted open only on the failure path


def test_center_crop_after_draft_keeps_the_centre():
    image = Image.new("RGB", (2400, 800), (0, 0, 255))
    image.paste((255, 0, 0), (800, 0, 1600, 800))
    out = ImageProcessor(ImageSettings(resize_mode="center_crop", encode_format="png"))(_encode(image, "JPEG"))
    pixels = np.asarray(Image.open(io.BytesIO(out.data)))
    assert pixels.shape == (256, 256, 3)
    assert pixels[:, 4:-4, 0].min() > 200 and pixels[:, 4:-4, 2].max() < 60  # all red: the centre third


def test_exif_rotation_with_keep_ratio():
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6
    data = _encode(image, "JPEG", exif=exif)
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="keep_ratio"))(data)
    assert (out.width, out.height) == (64, 128)
    assert (out.original_width, out.original_height) == (400, 200)


def test_corrupt_and_truncated_keep_their_reasons():
    processor = ImageProcessor(ImageSettings())
    png = _encode(Image.effect_noise((200, 200), 64).convert("L"), "PNG")
    assert processor(b"").reason == "not_an_image"
    assert processor(b"<html>not an image</html>").reason == "not_an_image"
    assert processor(_jpeg(64, 64)[:300]).reason == "corrupt_image"
    assert processor(png[: len(png) // 2]).reason == "corrupt_image"
    webp = _encode(Image.effect_noise((200, 200), 64).convert("RGB"), "WEBP", quality=90)
    assert processor(webp[: len(webp) // 2]).reason == "corrupt_image"
    assert processor(declare_size(_jpeg(16, 16), 40000, 40000)).reason == "too_many_pixels"


def test_failures_inside_are_reasons(monkeypatch):
    processor = ImageProcessor(ImageSettings())
    jpeg = _jpeg(64, 64)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(image_module, "_to_8bit", boom)
    out = processor(jpeg)
    assert (out.reason, out.message) == ("internal_error", "RuntimeError: boom")
    monkeypatch.undo()
    monkeypatch.setattr(Image.Image, "save", boom)
    out = processor(jpeg)
    assert out.reason == "encode_failed" and out.message == "JPEG: RuntimeError: boom"


def test_mangled_bytes_never_raise():
    rng = random.Random(7)
    seeds = [_jpeg(64, 48), _png(40, 30), _grey16(20, 10), _encode(Image.new("P", (30, 20)), "GIF")]
    processors = [ImageProcessor(ImageSettings(resize_mode=mode)) for mode in ("border", "center_crop", "no")]
    seen = set()
    for i in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        out = processors[i % 3](bytes(data))
        assert out.reason in REASONS or (out.reason is None and out.data)
        seen.add(out.reason)
    assert {"corrupt_image", None} <= seen


# Real pictures nobody here made, shipped inside installed packages: two photos and a clip-art PNG.
REAL_PICTURES = [
    os.path.join(sysconfig.get_paths()["purelib"], p)
    for p in (
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "sklearn/datasets/images/china.jpg",
        "matplotlib/mpl-data/sample_data/Minduka_Present_Blue_Pack.png",
    )
]


def test_the_fast_resize_keeps_quality_on_real_pictures():
    """reducing_gap (box-reduce by whole factors, then Lanczos) against one Lanczos pass over the full decode,
    on real photos shipped in installed packages: the crawl's output stays within 0.5 dB PSNR of the reference
    path's, for every source format and a range of downscales."""
    sources = [p for p in REAL_PICTURES if os.path.exists(p)]
    if not sources:
        pytest.skip("no real pictures installed (scikit-learn's and matplotlib's sample data)")

    def psnr(a, b):
        mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
        return 10 * np.log10(255**2 / max(mse, 1e-6))

    checked = 0
    for path in sources:
        picture = Image.open(path).convert("RGB")
        for side in (1024, 2048):
            scale = side / min(picture.size)
            source = picture.resize((round(picture.width * scale), round(picture.height * scale)))
            for fmt in ("PNG", "WEBP", "JPEG"):
                data = _encode(source, fmt, **({"quality": 92} if fmt != "PNG" else {}))
                decoded = Image.open(io.BytesIO(data)).convert("RGB")
                for out in (224, 384):
                    fast = ImageProcessor(ImageSettings(image_size=out, resize_mode="keep_ratio"))(data)
                    one_pass = ImageProcessor(
                        ImageSettings(image_size=out, resize_mode="keep_ratio", reducing_gap=None)
                    )
                    slow = one_pass(data)
                    reference = decoded.resize((fast.width, fast.height), Image.Resampling.LANCZOS)
                    got = psnr(Image.open(io.BytesIO(fast.data)).convert("RGB"), reference)
                    baseline = psnr(Image.open(io.BytesIO(slow.data)).convert("RGB"), reference)
                    assert got >= baseline - 0.5, (path, side, fmt, out, got, baseline)
                    checked += 1
    assert checked >= 12


def test_an_animated_webp_is_its_first_frame():
    """As img2dataset: an animation gives its first frame, not an error."""
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 30, 30), (30, 30, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="no", encode_format="png"))(buffer.getvalue())
    assert out.reason is None and Image.open(io.BytesIO(out.data)).convert("RGB").getpixel((10, 10)) == (200, 30, 30)


def test_a_still_webp_decodes_through_libwebp_to_the_same_output_as_pil(monkeypatch):
    """Still WebPs without alpha are decoded by OpenCV's libwebp (PIL's animation decoder is twice as slow at
    1024 px): on real photos, lossy and lossless, the crawl's output bytes are those of PIL's decode; a WebP
    with alpha still goes through PIL and is flattened on white; a truncated one is still `corrupt_image`."""
    sources = [p for p in REAL_PICTURES if os.path.exists(p)]
    if not sources:
        pytest.skip("no real pictures installed (scikit-learn's and matplotlib's sample data)")
    pil_decodes = []

    def pil_decode(image, data):
        pil_decodes.append(image.mode)
        image.load()
        return image

    fast = image_module.decode_pixels
    compared = 0
    for path in sources:
        picture = Image.open(path).convert("RGB")
        for options in ({"quality": 90}, {"lossless": True}):
            data = _encode(picture, "WEBP", **options)
            for mode in ("center_crop", "border"):
                processor = ImageProcessor(ImageSettings(image_size=160, resize_mode=mode))
                monkeypatch.setattr(image_module, "decode_pixels", fast)
                ours = processor(data)
                monkeypatch.setattr(image_module, "decode_pixels", pil_decode)
                theirs = processor(data)
                assert ours.reason is None and ours.data == theirs.data, (path, options, mode)
                compared += 1
    assert compared == 4 * len(sources) and pil_decodes == ["RGB"] * compared

    monkeypatch.setattr(image_module, "decode_pixels", fast)
    transparent = Image.new("RGBA", (64, 48), (0, 0, 255, 0))
    transparent.paste((200, 30, 30, 255), (0, 0, 32, 48))
    data = _encode(transparent, "WEBP", lossless=True)
    opened = Image.open(io.BytesIO(data))
    assert fast(opened, data) is opened  # PIL's own decode, alpha kept for the flattening
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="no", encode_format="png"))(data)
    flattened = Image.open(io.BytesIO(out.data)).convert("RGB")
    assert flattened.getpixel((10, 10)) == (200, 30, 30) and flattened.getpixel((50, 10)) == (255, 255, 255)
    lossy = _encode(Image.open(sources[0]).convert("RGB"), "WEBP", quality=90)
    assert ImageProcessor(ImageSettings(image_size=64))(lossy[: len(lossy) // 2]).reason == "corrupt_image"
