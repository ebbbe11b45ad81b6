"""Curation throughput, side by side in one run (`make bench-curate`, or `python bench/curate.py`):

annotate samples/s without CLIP, with the tiny CLIP and with a ViT-B/32-sized CLIP (both from config, random
weights: speed does not depend on what the weights learned) on real pictures in raw shards, each beside the
same CLIP's bare forward. Filter and shard at scale: bench/curate_scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def config(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def make_raw(folder: str, samples: int, per_shard: int, cache: str) -> list[str]:
    """Raw shards as the crawl writes them (256 px JPEG, caption, json) of real pictures from Debian packages
    (bench/pictures.py), reused in turn when there are fewer pictures than samples."""
    from pictures import load_pictures, source_body

    from pipeline.storage import Location
    from pipeline.tar_io import TarSampleWriter

    pictures = load_pictures(cache, min(samples, 400))
    bodies = [source_body(p, 256, "jpg") for p in pictures]
    out = Location(folder)
    out.makedirs()
    captions = []
    for shard in range(0, samples, per_shard):
        writer = TarSampleWriter(out, f"{shard // per_shard:05d}.tar")
        for i in range(shard, min(shard + per_shard, samples)):
            caption = f"picture {i % len(bodies)} of a series, drawn in colour on a white page"
            captions.append(caption)
            meta = {"url": f"bench/{i}", "original_width": 256, "original_height": 256}
            writer.add(
                {"__key__": f"{i:09d}", "jpg": bodies[i % len(bodies)], "txt": caption.encode(),
                 "json": json.dumps(meta).encode()}
            )  # fmt: skip
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


def bench_annotate(raw: str, out: str, clip: str | None, batch_size: int) -> float:
    """Seconds the whole stage spent mapping (the manifest's `last_run`: Ray start-up included)."""
    from pipeline.annotate.run import annotate

    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"input={raw}", f"output={out}", f"clip={clip or 'null'}", "progress=false"]
    manifest = annotate(config("annotate", *overrides, f"clip_batch_size={batch_size}"))
    return manifest["last_run"]["seconds"]


def bare_forward(clip: str, captions: list[str], batch_size: int, seconds: float = 20.0) -> float:
    """Samples/s of the same CLIP's image and text forward passes at `batch_size` in this process, on inputs
    already tensors (torch's default threads: every core). The stage's limit: nothing but the model runs."""
    import torch

    from training.clip.encode import ClipEncoder

    encoder = ClipEncoder.from_folder(clip)
    pixels = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size)
    tokens = encoder.tokens((captions * batch_size)[:batch_size])
    model, done, timed = encoder.model, 0, 0.0
    with torch.no_grad():
        for step in range(1000):
            started = time.perf_counter()
            model.get_image_features(pixel_values=pixels)
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            if step:  # the first pass warms up
                done, timed = done + batch_size, timed + time.perf_counter() - started
            if timed > seconds and step >= 3:
                break
    return done / timed


def annotate_table(args) -> None:
    """Each cell annotates a small and a large input; the stage's steady state is the marginal rate between
    them, (N2 − N1) / (t2 − t1): start-up (Ray, actors, model loads) is the same in both and cancels."""
    from pictures import DEFAULT_CACHE

    cells = [("no CLIP", None, args.samples), ("clip_tiny", "clip_tiny", args.samples),
             ("clip_vit_b32", "clip_vit_b32", args.big_samples)]  # fmt: skip
    cells = [c for c in cells if c[0] in args.cells.split(",")]
    raws, rows = {}, []
    for name, model, samples in cells:
        sizes = (samples // 4, samples)
        for n in sizes:
            if n not in raws:
                raws[n] = (
                    os.path.join(args.out, f"raw{n}"),
                    make_raw(os.path.join(args.out, f"raw{n}"), n, 256, DEFAULT_CACHE),
                )
        clip = make_clip(os.path.join(args.out, model), model, raws[samples][1]) if model else None
        bare = bare_forward(clip, raws[samples][1], args.batch_size) if clip else float("nan")
        runs = [
            bench_annotate(raws[n][0], os.path.join(args.out, f"meta_{name}_{n}"), clip, args.batch_size) for n in sizes
        ]
        steady = (sizes[1] - sizes[0]) / (runs[1] - runs[0])
        rows.append((name, f"{sizes[0]} / {sizes[1]}", bare, steady, steady / bare, sizes[1] / runs[1]))
    print(
        f"\nannotate on real pictures (256 px JPEG, {os.cpu_count()} CPUs), batch {args.batch_size}: the stage once "
        "warm (marginal rate between two input sizes) beside the same CLIP's bare forward"
    )
    print("| CLIP | samples | bare forward samples/s | stage steady samples/s | steady / bare | stage end to end |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, samples, bare, steady, ratio, e2e in rows:
        print(f"| {name} | {samples} | {bare:,.1f} | {steady:,.1f} | {ratio:.2f} | {e2e:,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="annotate samples without CLIP and with clip_tiny")
    parser.add_argument("--big-samples", type=int, default=448, help="annotate samples with clip_vit_b32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cells", default="no CLIP,clip_tiny,clip_vit_b32", help="annotate cells, comma-separated")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "curate"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(args.out, ignore_errors=True)
    annotate_table(args)


if __name__ == "__main__":
    main()
