"""Near-duplicate detection on real pictures nobody here made, with labels (`make bench-dedup`, or
`python bench/dedup.py [--clipart 1500] [--near min_correlation=0.9] [--json out.json]`).

Sources, fetched once into `--cache` (Debian packages with `apt-get download` + `dpkg-deb -x`, scikit-image's
sample pictures from its wheel with `pip download`):
- clipart: `openclipart-png`, `--clipart` files drawn at random (seeded) from /usr/share/openclipart/png;
- icon: `oxygen-icon-theme`, every 256×256 icon: families of distinct pictures that look alike (folder-blue vs
  folder-green, document icons that differ by a small emblem), the hard negatives;
- photo: `gnome-backgrounds` wallpapers (the webp ones) and scikit-image's sample data (png, jpg).

Source hygiene, so that two sources are two pictures and a label is honest:
- alpha is flattened on white; sources whose shorter side is under 48 px are skipped; the rest are
  downscaled (LANCZOS) to at most 512 px on the longer side, a web-sized original;
- a source that is the same picture as an earlier one is dropped, by a test independent of the rules under
  test and strict: mean absolute difference under 3 grey levels between the two 64×64 RGB BOX downscales.
  Icon themes ship one picture under several names (symlinks are resolved first), and openclipart files
  repeat across categories;
- openclipart's `star_<n>pt<m>step*.png` (1,375 files of line stars, n points in steps of m) are left out:
  a generated family whose members differ below thumbnail resolution.

Each source is one group with one copy of one alteration kind (round-robin over the kinds after a seeded
shuffle): exact (the same bytes), resize80, jpeg30, crop5, crop10, crop_random (0–10% a side), bright±20,
contrast±20, flip. Originals are served as PNG (from a PNG, or at most 256 colours) or JPEG q92; every row then
goes through the crawl's `ImageProcessor(ImageSettings())` (256 px border, JPEG) and annotate's signals, in
process, in keys of random order. The filter's shipped `exact_duplicate` and `near_duplicate` rules
(conf/filter/basic.yaml, `--near key=value` to override) run as the filter runs them.

A group is *caught* when exactly one of its two rows is kept, *missed* when both are, *lost* when neither is
(its picture was merged into another). A false merge is a row dropped as a repeat of another group's row.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pictures import fetch_debian  # bench/ is the script's folder
from PIL import Image, ImageEnhance, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PACKAGES = {  # Debian package → the folder of pictures it installs, under <cache>/x
    "openclipart-png": "usr/share/openclipart/png",
    "gnome-backgrounds": "usr/share/backgrounds/gnome",
    "oxygen-icon-theme": "usr/share/icons/oxygen/base/256x256",
}
SKIMAGE_DATA = "sk/skimage/data"
STARS = re.compile(r"star_\d+pt\d+step.*\.png$")
KINDS = (
    "exact",
    "resize80",
    "jpeg30",
    "crop5",
    "crop10",
    "crop_random",
    "bright+20",
    "bright-20",
    "contrast+20",
    "contrast-20",
    "flip",
)
FAMILIES = ("clipart", "icon", "photo")
MIN_SIDE, MAX_SIDE = 48, 512
SAME_PICTURE_MAD, SAME_PICTURE_SIDE = 3.0, 64


# -- sources -----------------------------------------------------------------------------------------------
def fetch(cache: str) -> None:
    """Everything the bench reads, into `cache`; what is already extracted there is reused."""
    fetch_debian(cache, PACKAGES)
    if not os.path.isdir(os.path.join(cache, SKIMAGE_DATA)):
        wheels = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
        if not wheels:
            print("fetching scikit-image's sample data (its wheel)…", flush=True)
            command = [sys.executable, "-m", "pip", "download", "--quiet", "scikit-image", "--no-deps", "-d", cache]
            subprocess.run(command, check=True)
            wheels = glob.glob(os.path.join(cache, "scikit_image-*.whl"))
        with zipfile.ZipFile(sorted(wheels)[-1]) as wheel:
            names = [n for n in wheel.namelist() if re.fullmatch(r"skimage/data/[^/]+\.(png|jpg)", n)]
            wheel.extractall(os.path.join(cache, "sk"), members=names)


def source_files(cache: str, clipart: int, seed: int) -> list[tuple[str, str]]:
    """(family, path) of every candidate source, in a fixed order: symlinks resolved, stars left out."""
    x = os.path.join(cache, "x")
    art = sorted(glob.glob(os.path.join(x, PACKAGES["openclipart-png"], "**", "*.png"), recursive=True))
    art = [p for p in art if not STARS.search(os.path.basename(p))]
    art = sorted(random.Random(seed).sample(art, min(clipart, len(art))))
    icons = sorted(glob.glob(os.path.join(x, PACKAGES["oxygen-icon-theme"], "**", "*.png"), recursive=True))
    photos = sorted(glob.glob(os.path.join(x, PACKAGES["gnome-backgrounds"], "*.webp")))
    photos += sorted(p for p in glob.glob(os.path.join(cache, SKIMAGE_DATA, "*")) if p.endswith((".png", ".jpg")))
    seen, files = set(), []
    for family, paths in (("clipart", art), ("icon", icons), ("photo", photos)):
        for path in paths:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append((family, path))
    return files


def load_source(path: str) -> Image.Image | None:
    """RGB, alpha flattened on white, at most MAX_SIDE px; None when the picture is under MIN_SIDE or broken."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # one 13000-px clip art: ours to trust
            image = Image.open(path)
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: the high byte
                image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
            image = image.convert("RGB")
    except Exception as err:  # a file PIL cannot read is no source
        print(f"skipping {path}: {type(err).__name__}: {err}")
        return None
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
    return image if min(image.size) >= MIN_SIDE else None


def small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((SAME_PICTURE_SIDE,) * 2, Image.BOX), np.int16)


def same_picture_as_earlier(smalls: np.ndarray) -> np.ndarray:
    """For (N, 64, 64, 3) downscales: the index of an earlier source that is the same picture, or -1.
    Block means over 8×8 bound the 64×64 mean absolute difference from below, so they prune pairs first."""
    n = len(smalls)
    coarse = smalls.reshape(n, 8, 8, 8, 8, 3).astype(np.float32).mean(axis=(2, 4)).reshape(n, -1)
    flat = smalls.reshape(n, -1)
    earlier = np.full(n, -1, np.int64)
    for i in range(1, n):
        lower = np.abs(coarse[:i] - coarse[i]).mean(axis=1)
        for j in np.flatnonzero(lower < SAME_PICTURE_MAD):
            if np.abs(flat[j] - flat[i]).mean() < SAME_PICTURE_MAD:
                earlier[i] = j
                break
    return earlier


def load_sources(cache: str, clipart: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """The source pictures (family, path, image, png) after hygiene, and their 64×64 downscales."""
    sources = []
    candidates = source_files(cache, clipart, seed)
    for family, path in candidates:
        image = load_source(path)
        if image is not None:
            png = path.endswith(".png") or image.getcolors(256) is not None
            sources.append({"family": family, "path": path, "image": image, "png": png})
    smalls = np.stack([small(s["image"]) for s in sources])
    earlier = same_picture_as_earlier(smalls)
    print(
        f"{len(candidates)} files, {len(sources)} pictures of at least {MIN_SIDE} px, "
        f"{int((earlier >= 0).sum())} the same picture as an earlier one",
        flush=True,
    )
    return [s for s, e in zip(sources, earlier) if e < 0], smalls[earlier < 0]


# -- rows ----------------------------------------------------------------------------------------------------
def serve(image: Image.Image, png: bool, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG") if png else image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def alter(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if kind.startswith("crop"):
        sides = rng.uniform(0, 0.10, 4) if kind == "crop_random" else np.full(4, int(kind[4:]) / 100)
        box = (sides[0] * w, sides[1] * h, w - sides[2] * w, h - sides[3] * h)
        return image.crop(tuple(round(v) for v in box))
    if kind == "resize80":
        return image.resize((round(w * 0.8), round(h * 0.8)), Image.LANCZOS)
    if kind.startswith(("bright", "contrast")):
        enhancer = ImageEnhance.Brightness if kind.startswith("bright") else ImageEnhance.Contrast
        return enhancer(image).enhance(1 + int(kind[-3:]) / 100)
    if kind == "flip":
        return ImageOps.mirror(image)
    raise ValueError(f"alteration kind {kind!r}; expected one of {', '.join(KINDS)}")


def make_rows(sources: list[dict], seed: int) -> list[dict]:
    """Each source's original and its one copy, as the crawl stores them; keys in a random order."""
    from pipeline.crawl.image import ImageProcessor, ImageSettings

    processor = ImageProcessor(ImageSettings())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))
    rows = []
    for position, g in enumerate(order.tolist()):
        source = sources[g]
        kind = KINDS[position % len(KINDS)]
        source["kind"] = kind
        original = serve(source["image"], source["png"])
        if kind == "exact":
            copy = original
        elif kind == "jpeg30":
            copy = serve(source["image"], png=False, quality=30)
        else:
            copy = serve(alter(source["image"], kind, rng), source["png"])
        for is_copy, data in ((False, original), (True, copy)):
            stored = processor(data)
            rows.append({"group": g, "copy": is_copy, "stored": stored})
    for key, row in zip(rng.permutation(len(rows)).tolist(), rows):
        row["key"] = f"{key:06d}"
    return sorted(rows, key=lambda r: r["key"])


def annotate_rows(rows: list[dict]) -> tuple[dict[str, np.ndarray], float]:
    """The metadata annotate would store for the rows, in the filter's in-memory form (read_metadata's), the
    signals' images/s and their names. The signals are annotate's own, on batches as ShardAnnotator makes them."""
    from pipeline.annotate.signals import SAMPLES_PER_BATCH, ShardAnnotator, _column

    signals = ShardAnnotator(ROOT).signals
    parts, seconds = [], 0.0
    for start in range(0, len(rows), SAMPLES_PER_BATCH):
        chunk = rows[start : start + SAMPLES_PER_BATCH]
        batch = {
            "key": _column([r["key"] for r in chunk]),
            "shard": _column(["00000.tar"] * len(chunk)),
            "shard_samples": np.full(len(chunk), len(rows), np.int64),
            "image": _column([r["stored"].data for r in chunk]),
            "caption": _column(["a picture from the dedup bench"] * len(chunk)),
            "url": _column([None] * len(chunk)),
            "original_width": _column([r["stored"].original_width for r in chunk]),
            "original_height": _column([r["stored"].original_height for r in chunk]),
        }
        started = time.perf_counter()
        for signal in signals:
            batch = signal(batch)
        seconds += time.perf_counter() - started
        batch.pop("image")
        parts.append(batch)
    meta = {}
    for name in sorted(parts[0]):
        values = np.concatenate([p[name] for p in parts])
        meta[name] = values.astype(np.float64) if values.dtype.kind in "iufb" else values.astype(object)
    return meta, len(rows) / seconds, [type(s).__name__ for s in signals]


# -- rules and figures -----------------------------------------------------------------------------------------
def load_rules(overrides: list[str]) -> list[tuple[str, object]]:
    cfg = OmegaConf.load(os.path.join(ROOT, "conf", "filter", "basic.yaml"))
    near = OmegaConf.merge(cfg.near_duplicate, OmegaConf.from_dotlist(overrides))
    return [("exact_duplicate", instantiate(cfg.exact_duplicate)), ("near_duplicate", instantiate(near))]


def run_rules(meta: dict, rules: list) -> tuple[np.ndarray, list, float]:
    """The filter's own apply_rules, timed: every row's reason and each duplicate rule's pairs (dropped, kept)."""
    from pipeline.filter.run import apply_rules

    started = time.perf_counter()
    outcome = apply_rules(meta, rules)
    return outcome.reason, outcome.pairs, time.perf_counter() - started


def outcomes(rows: np.ndarray, kept: np.ndarray, group: np.ndarray) -> dict[str, int]:
    """Of the groups of the rows in the mask `rows`: how many keep one row (caught), two (missed), none (lost)."""
    per_group = np.bincount(group, weights=kept)[np.unique(group[rows])]
    return {
        "groups": len(per_group),
        "caught": int((per_group == 1).sum()),
        "missed": int((per_group == 2).sum()),
        "lost": int((per_group == 0).sum()),
    }


def evaluate(reason, pairs, rows, sources, smalls, seconds) -> dict:
    group = np.array([r["group"] for r in rows])
    kept = np.array([r is None for r in reason])
    kinds = np.array([sources[g]["kind"] for g in group])
    families = np.array([sources[g]["family"] for g in group])
    merges = {}  # (dropped source, kept source) → the rows that merged them
    for found in pairs:
        for d, k, distance in zip(found.dropped.tolist(), found.kept.tolist(), found.distance.tolist()):
            if group[d] != group[k]:
                a, b = sources[group[d]], sources[group[k]]
                merge = merges.setdefault((a["path"], b["path"]), {"rule": found.rule, "rows": 0, "distance": np.inf})
                merge.update(rows=merge["rows"] + 1, distance=min(merge["distance"], distance), kind=a["kind"])
                merge.update(dropped=a["path"], kept=b["path"])
                merge["source_mad"] = float(np.abs(smalls[group[d]] - smalls[group[k]]).mean())
    return {
        "all": outcomes(np.ones(len(rows), bool), kept, group),
        "by_kind": {k: outcomes(kinds == k, kept, group) for k in KINDS},
        "by_family": {f: outcomes(families == f, kept, group) for f in FAMILIES},
        "seconds": seconds,
        "false_merges": sorted(merges.values(), key=lambda m: -m["source_mad"]),
    }


def print_report(args, sources, meta, signal_rate, results) -> None:
    counts = {f: sum(s["family"] == f for s in sources) for f in FAMILIES}
    families = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(
        f"\nnear-duplicate benchmark: {len(sources)} source pictures ({families}), {len(meta['key'])} rows;"
        f" {os.cpu_count()} CPUs; near: {' '.join(args.near) or 'defaults'}"
    )
    print(f"signals ({', '.join(results['signals'])}): {signal_rate:.0f} images/s")
    names = list(results["rules"])
    for title, part, share in (("alteration kind", "by_kind", "recall"), ("family", "by_family", "one kept")):
        head = "".join(f"{n + ' ' + share:>22}{'lost':>7}" for n in names)
        print(f"\n{title:<14}{'groups':>7}{head}")
        for label in list(results["rules"][names[0]][part]) + ["all"]:
            figures = [results["rules"][n][part].get(label) or results["rules"][n]["all"] for n in names]
            cells = "".join(f"{f['caught'] / f['groups']:>22.3f}{f['lost'] / f['groups']:>7.3f}" for f in figures)
            print(f"{label:<14}{figures[0]['groups']:>7}{cells}")
    print(f"\n{'rules':<14}{'seconds':>9}{'rows/s':>10}{'missed':>8}{'lost':>6}{'false merges (pairs)':>22}")
    for name, r in results["rules"].items():
        rate = len(meta["key"]) / r["seconds"]
        print(
            f"{name:<14}{r['seconds']:>9.2f}{rate:>10.0f}{r['all']['missed']:>8}{r['all']['lost']:>6}"
            f"{len(r['false_merges']):>22}"
        )
    worst = results["rules"][names[-1]]["false_merges"][:10]
    print(
        f"\nworst false merges of {names[-1]}, pairs of source pictures (largest 64×64 mean abs. difference first;"
        f" distance: the rule's): dropped ← kept"
    )
    print(f"  {'MAD':>5} {'distance':>8}  {'rows':>4}  {'kind':<12}")
    for m in worst:
        short = lambda p: os.path.relpath(p, args.cache)
        print(
            f"  {m['source_mad']:5.1f} {m['distance']:8.3f}  {m['rows']:>4}  {m['kind']:<12}"
            f"{short(m['dropped'])}  ←  {short(m['kept'])}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/pixelmill/dedup-bench"))
    parser.add_argument("--clipart", type=int, default=1500, help="openclipart files drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--near", action="append", default=[], help="near_duplicate option override, key=value")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    fetch(args.cache)
    started = time.time()
    sources, smalls = load_sources(args.cache, args.clipart, args.seed)
    rows = make_rows(sources, args.seed)
    meta, signal_rate, signals = annotate_rows(rows)
    print(f"{len(rows)} rows made and annotated in {time.time() - started:.0f} s", flush=True)
    rules = load_rules(args.near)
    results = {"signals": signals, "rules": {}}
    for label, chosen in (("exact", rules[:1]), ("exact+near", rules)):
        missing = sorted({c for _, rule in chosen for c in rule.columns} - set(meta))
        if missing:
            sys.exit(f"the rules need column(s) {missing}; annotate's signals made {sorted(meta)}")
        reason, pairs, seconds = run_rules(meta, chosen)
        results["rules"][label] = evaluate(reason, pairs, rows, sources, smalls, seconds)
    print_report(args, sources, meta, signal_rate, results)
    if args.json:
        options = {"clipart": args.clipart, "seed": args.seed, "near": args.near, "cpus": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump({**results, "options": options, "signal_images_per_s": signal_rate}, f, indent=1)


if __name__ == "__main__":
    main()
