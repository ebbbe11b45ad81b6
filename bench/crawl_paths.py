"""Where a crawled image's time goes, on one core: decode, resize and encode, pixelmill's path beside img2dataset's.

    python bench/crawl_paths.py [--sizes 256,512,1024,2048] [--formats jpg,png,webp] [--mode center_crop]

For each cell (source size × format, the real pictures of `bench/pictures.py`), it times on one thread:
- pixelmill's whole `ImageProcessor` and its three steps (Pillow open + `draft` + the crawl's decode, OpenCV's
  libwebp for a still WebP; the resample; the JPEG encode), and the alternatives measured for each step
  (simplejpeg's libjpeg-turbo decode and encode, OpenCV's resamplers, as img2dataset uses);
- img2dataset's whole `Resizer` (OpenCV decode, INTER_AREA, OpenCV encode), same size and mode;
and the PSNR of each output against the reference resize (full decode, Pillow Lanczos, no encode), so that a
faster path can be judged by the quality it keeps (the crawl's rule: within 0.5 dB of the current path).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# img2dataset imports albumentations, which asks PyPI for a newer version on import: benchmarks talk to
# 127.0.0.1 only (its children, img2dataset's command included, inherit this)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(HERE))
OUTPUT_SIZE = {256: 224, 512: 256, 1024: 256, 2048: 384}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-6)))


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def timed(function, items) -> tuple[list, float]:
    started = time.perf_counter()
    outputs = [function(item) for item in items]
    return outputs, (time.perf_counter() - started) / len(items) * 1e3  # ms an image


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def main() -> None:
    import cv2
    import simplejpeg
    from img2dataset.resizer import Resizer
    from pictures import DEFAULT_CACHE, load_pictures, source_body

    from pipeline.crawl.image import ImageProcessor, ImageSettings, decode_pixels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--formats", default="jpg,png,webp")
    parser.add_argument("--pictures", type=int, default=30)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one core per image, as both crawlers run it
    pictures = load_pictures(args.cache, args.pictures)
    print("ms an image on one core; PSNR (dB) against full decode + Pillow Lanczos, centre crop")
    print(
        "| cell | pixelmill | its decode / resize / encode | simplejpeg decode / encode | "
        "OpenCV cubic / area resize | img2dataset |"
    )
    print("|---|---:|---|---|---|---:|")
    for size in map(int, args.sizes.split(",")):
        out = OUTPUT_SIZE[size]
        for fmt in args.formats.split(","):
            bodies = [source_body(p, size, fmt) for p in pictures]
            sources = [Image.open(io.BytesIO(b)).convert("RGB") for b in bodies]
            crops = [np.ascontiguousarray(np.asarray(s.crop(centre_box(*s.size)))) for s in sources]
            references = [np.asarray(Image.fromarray(c).resize((out, out), Image.Resampling.LANCZOS)) for c in crops]

            processor = ImageProcessor(ImageSettings(image_size=out, resize_mode="center_crop"))
            ours, ours_ms = timed(lambda b: processor(b).data, bodies)

            def crawl_decode(data: bytes) -> tuple[Image.Image, tuple[float, ...]]:
                """As the crawl decodes: JPEG reduced by `draft` to the smallest scale above the target, a still
                WebP through OpenCV's libwebp, the rest by Pillow."""
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if image.format == "JPEG":
                    scale = out / min(width, height)
                    image.draft("RGB", (int(np.ceil(width * scale)), int(np.ceil(height * scale))))
                image = decode_pixels(image, data)
                fx, fy = image.width / width, image.height / height
                box = centre_box(width, height)
                return image.convert("RGB"), (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)

            loaded, decode_ms = timed(crawl_decode, bodies)
            resized, resize_ms = timed(lambda ib: ib[0].resize((out, out), Image.Resampling.LANCZOS, box=ib[1]), loaded)
            _, encode_ms = timed(pillow_jpeg, resized)
            jpeg_bodies = [b for b in bodies if Image.open(io.BytesIO(b)).format == "JPEG"]
            sj_decode = f"{timed(simplejpeg.decode_jpeg, jpeg_bodies)[1]:.2f}" if jpeg_bodies else "–"
            _, sj_encode_ms = timed(lambda r: simplejpeg.encode_jpeg(r, 95, colorsubsampling="420"), references)
            cubic, cubic_ms = timed(lambda c: cv2.resize(c, (out, out), interpolation=cv2.INTER_CUBIC), crops)
            area, area_ms = timed(lambda c: cv2.resize(c, (out, out), interpolation=cv2.INTER_AREA), crops)
            resizer = Resizer(out, "center_crop", False, encode_quality=95)
            theirs, theirs_ms = timed(lambda b: resizer(io.BytesIO(b))[0], bodies)

            def quality(outputs) -> float:
                return float(np.mean([psnr(decoded(o), r) for o, r in zip(outputs, references)]))

            def array_quality(arrays) -> float:
                return float(np.mean([psnr(a, r) for a, r in zip(arrays, references)]))

            print(
                f"| {size} {fmt} → {out} | {ours_ms:.2f} ({quality(ours):.1f} dB) | "
                f"{decode_ms:.2f} / {resize_ms:.2f} / {encode_ms:.2f} | {sj_decode} / {sj_encode_ms:.2f} | "
                f"{cubic_ms:.2f} ({array_quality(cubic):.1f} dB) / {area_ms:.2f} ({array_quality(area):.1f} dB) | "
                f"{theirs_ms:.2f} ({quality(theirs):.1f} dB) |",
                flush=True,
            )


def pillow_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
