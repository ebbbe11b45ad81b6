"""Zero-shot evaluation throughput (`make bench-eval`, or `python bench/eval.py`): images/s of
`evaluation.run task=zeroshot` on a held-out world eval set, for the tiny and the ViT-B/32-sized CLIP
configs (random weights: speed does not depend on what they learned), side by side in one run. The time
covers reading and decoding the tars, the image tower and the class-prompt embeddings; not model loading.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch
from curate import ROOT, config, make_clip  # bench/ is the script's folder


def main() -> None:
    from evaluation.zeroshot.benchmark import zeroshot_classification
    from evaluation.zeroshot.datasets import EvalSet
    from evaluation.zeroshot.templates import resolve_templates
    from pipeline.eval_set.export import export_eval_set
    from training.clip.encode import ClipEncoder
    from training.clip.model import load_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "eval"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    dataset = os.path.join(args.out, "colour")
    export_eval_set(config("eval_set", "attribute=colour", f"output={dataset}", f"n={args.images}"))
    eval_set = EvalSet.open(dataset, need_classnames=True)
    templates = resolve_templates("imagenet80", dataset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captions = ["a red circle on the left", "two blue squares at the top", "three green stars"] * 50
    rows = []
    for model in ("clip_tiny", "clip_vit_b32"):
        encoder = ClipEncoder.from_bundle(load_clip(make_clip(os.path.join(args.out, model), model, captions)), device)
        zeroshot_classification(
            encoder, eval_set, eval_set.classnames, templates[:2], args.batch, args.workers, progress=False
        )
        start = time.perf_counter()  # after a warm-up pass: threads, allocator and file cache are hot
        zeroshot_classification(
            encoder, eval_set, eval_set.classnames, templates, args.batch, args.workers, progress=False
        )
        seconds = time.perf_counter() - start
        rows.append((model, args.images / seconds, seconds))
    print(
        f"\nzero-shot classification, {args.images} world images (128 px), 6 classes × 80 templates, batch "
        f"{args.batch}, "
        f"{args.workers} loader workers, {device}"
    )
    print(f"{'model':<16}{'images/s':>10}{'seconds':>10}")
    for model, rate, seconds in rows:
        print(f"{model:<16}{rate:>10.1f}{seconds:>10.2f}")


if __name__ == "__main__":
    main()
