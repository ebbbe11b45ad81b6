"""Curation throughput, side by side in one run (`make bench-curate`, or `python bench/curate.py`):

- annotate samples/s without CLIP, with the tiny CLIP and with a ViT-B/32-sized CLIP (both from config,
  random weights: speed does not depend on what the weights learned), on world images in raw shards;
- filter rows/s on 1M synthetic metadata rows with the basic rules (near-duplicate search included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def config(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def make_raw(folder: str, samples: int, per_shard: int) -> list[str]:
    from pipeline.storage import Location
    from pipeline.tar_io import TarSampleWriter
    from pipeline.world import World

    world = World(OmegaConf.merge(OmegaConf.load(os.path.join(CONF, "world", "default.yaml")), {"n": samples}))
    out = Location(folder)
    out.makedirs()
    captions = []
    for shard in range(0, samples, per_shard):
        writer = TarSampleWriter(out, f"{shard // per_shard:05d}.tar")
        for i in range(shard, min(shard + per_shard, samples)):
            row = world.rows[i]
            captions.append(row["caption"])
            meta = {"url": f"world/{i}", "original_width": 128, "original_height": 128}
            writer.add(
                {
                    "__key__": f"{i:09d}",
                    "jpg": world.image_bytes(i),
                    "txt": row["caption"].encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
        writer.close()
    return captions


def make_clip(folder: str, model: str, captions: list[str]) -> str:
    from training.clip.model import ClipBundle, image_processor_for, save_clip
    from training.tokenizer import train_tokenizer

    model_cfg = OmegaConf.load(os.path.join(CONF, "model", f"{model}.yaml"))
    tokenizer = train_tokenizer(captions, vocab_size=1000, max_length=int(model_cfg.text.max_position_embeddings))
    clip = instantiate(model_cfg, tokenizer=tokenizer)
    save_clip(folder, ClipBundle(clip, tokenizer, image_processor_for(int(model_cfg.image_size))))
    return folder


def bench_annotate(raw: str, out: str, clip: str | None) -> float:
    from pipeline.annotate.run import annotate

    shutil.rmtree(out, ignore_errors=True)
    manifest = annotate(config("annotate", f"input={raw}", f"output={out}", f"clip={clip or 'null'}", "progress=false"))
    return manifest["counts"]["samples"] / manifest["last_run"]["seconds"]


def make_meta(folder: str, rows: int, seed: int = 0) -> None:
    """Synthetic metadata in annotate's schema: random sizes, captions and hashes, 5% exact and 5% near copies."""
    from pipeline.storage import Location, write_manifest

    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, (rows, 24), dtype=np.uint8)
    copies = rng.choice(rows, size=rows // 10, replace=False)
    hashes[copies] = hashes[rng.integers(0, rows, rows // 10)]
    near = copies[: rows // 20]
    hashes[near, rng.integers(0, 24, len(near))] ^= 1
    sha = np.array([f"{i:064x}" for i in range(rows)], dtype=object)
    sha[copies[rows // 20 :]] = sha[rng.integers(0, rows, len(copies) - rows // 20)]
    w, h = rng.integers(16, 1024, rows), rng.integers(16, 1024, rows)
    words = rng.integers(0, 30, rows)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(rows)],
            "shard": ["00000.tar"] * rows,
            "url": [None] * rows,
            "caption": [None] * rows,
            "sha256": sha.tolist(),
            "dhash": [bytes(r).hex() for r in hashes],
            "width": w.astype(np.int32),
            "height": h.astype(np.int32),
            "original_width": w.astype(np.int32),
            "original_height": h.astype(np.int32),
            "aspect_ratio": (np.maximum(w, h) / np.minimum(w, h)).astype(np.float32),
            "caption_chars": (words * 6).astype(np.int32),
            "caption_words": words.astype(np.int32),
            "error": pa.nulls(rows, pa.string()),
            "clip_score": rng.uniform(-0.1, 0.5, rows).astype(np.float32),
        }
    )
    location = Location(folder)
    location.makedirs()
    pq.write_table(table, location.path("00000.parquet"))
    write_manifest(location, "annotate", {}, {"samples": rows}, {"00000.parquet": "synthetic"}, time.time())


def bench_filter(meta: str, out: str) -> tuple[float, dict]:
    from pipeline.filter.run import filter_samples

    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    # The near-duplicate rule needs annotate's thumbnails, which these rows do not have: its figures at
    # scale are bench/dedup_scale.py's.
    manifest = filter_samples(
        config("filtering", f"input={meta}", f"output={out}", "tracking=false", "filter.near_duplicate=null")
    )
    return manifest["counts"]["rows"] / (time.time() - started), manifest["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--filter-rows", type=int, default=1_000_000)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "curate"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(args.out, ignore_errors=True)
    raw = os.path.join(args.out, "raw")
    captions = make_raw(raw, args.samples, per_shard=128)
    rows = [("annotate, no CLIP", bench_annotate(raw, os.path.join(args.out, "meta0"), None))]
    for model in ("clip_tiny", "clip_vit_b32"):
        clip = make_clip(os.path.join(args.out, model), model, captions)
        rows.append((f"annotate, {model}", bench_annotate(raw, os.path.join(args.out, f"meta_{model}"), clip)))
    meta = os.path.join(args.out, "synthetic_meta")
    make_meta(meta, args.filter_rows)
    rate, counts = bench_filter(meta, os.path.join(args.out, "selection"))
    print(
        f"\ncuration throughput ({os.cpu_count()} CPUs; annotate on {args.samples} world images, filter on "
        f"{args.filter_rows:,} rows)"
    )
    print(f"{'step':<28}{'per second':>14}")
    for name, value in rows:
        print(f"{name:<28}{value:>12.1f} samples")
    print(
        f"{'filter basic, no near-dup':<28}{rate:>12,.0f} rows   (kept {counts['kept']:,}; dropped {counts['dropped']})"
    )


if __name__ == "__main__":
    main()
