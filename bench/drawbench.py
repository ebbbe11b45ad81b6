"""DrawBench-style evaluation speed, side by side in one run (`make bench-drawbench`, or `python bench/drawbench.py`):

1. images/s of generation, of CLIPScore judging, and of the world suite's ground-truth checkers;
2. DPM-Solver++ at 20 steps against DDIM at 50 on the same world-suite prompts and seeds: images/s, and the
   CLIPScore and checker accuracy of what each draws.

By default it first trains what it measures on world images (a tiny CLIP as the judge and text encoder, an
autoencoder, a UNet: a few CPU minutes, kept in bench/out/drawbench for the next run); `--model <pipeline>
--judge <CLIP folder>` measures existing folders instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch
from curate import ROOT, config  # bench/ is the script's folder
from PIL import Image

from evaluation.t2i.drawbench import generate_images, score_images, summarise  # noqa: E402
from evaluation.t2i.prompt_suites import world_suite, world_vocabulary  # noqa: E402
from evaluation.t2i.world_checks import ObjectFinder, judge  # noqa: E402
from pipeline.world.shards import write_world_shards
from training.clip.encode import ClipEncoder  # noqa: E402
from training.clip.model import load_clip  # noqa: E402
from training.train import train  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "tracking=false", "checkpoint_every=100000"]


def train_models(out: str, samples: int, clip_steps: int, vae_steps: int, ldm_steps: int) -> tuple[str, str]:
    """(pipeline folder, CLIP folder), trained once on world images and reused by later runs."""
    if os.path.exists(f"{out}/ldm/pipeline/model_index.json"):
        return f"{out}/ldm/pipeline", f"{out}/clip/clip"
    shards = write_world_shards(f"{out}/shards", samples, 500, image_size=32)
    train(
        config(
            "train",
            "task=clip",
            f"data.path={shards}",
            f"output={out}/clip",
            "data.batch_size=128",
            f"trainer.max_steps={clip_steps}",
            "module.optimizer.lr=2e-3",
            "module.warmup_steps=10",
            *QUIET,
        )
    )
    train(
        config(
            "train",
            "task=vae",
            f"data.path={shards}",
            f"output={out}/vae",
            "data.batch_size=32",
            f"trainer.max_steps={vae_steps}",
            "module.optimizer.lr=2e-3",
            "module.warmup_steps=10",
            *QUIET,
        )
    )
    train(
        config(
            "train",
            "task=ldm",
            f"data.path={shards}",
            f"vae={out}/vae/vae",
            f"clip={out}/clip/clip",
            f"output={out}/ldm",
            "data.batch_size=32",
            f"trainer.max_steps={ldm_steps}",
            "module.optimizer.lr=1e-3",
            "module.warmup_steps=50",
            "module.ema_decay=0.999",
            *QUIET,
        )
    )
    return f"{out}/ldm/pipeline", f"{out}/clip/clip"


def seconds(work) -> tuple[object, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a pipeline folder (default: train one on world images)")
    parser.add_argument("--judge", help="the CLIP folder that scores (default: the one trained with the model)")
    parser.add_argument("--per-category", type=int, default=20, help="world-suite prompts per category")
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--samples", type=int, default=3000, help="world images to train on")
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--ldm-steps", type=int, default=1500)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "drawbench"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, judge_path = args.model, args.judge
    if not model:
        model, judge_path = train_models(args.out, args.samples, args.clip_steps, args.vae_steps, args.ldm_steps)

    prompts = world_suite(args.per_category, seed=0)
    encoder = ClipEncoder.from_bundle(load_clip(judge_path), device)
    finder = ObjectFinder(world_vocabulary()["colours"])
    seeds = list(range(args.n))
    results = {}
    for sampler, steps in (("dpm", 20), ("ddim", 50)):
        folder = os.path.join(args.out, "images", f"{sampler}{steps}")
        shutil.rmtree(folder, ignore_errors=True)
        generation = {
            "n": args.n,
            "seed": 0,
            "steps": steps,
            "guidance_scale": 5.0,
            "sampler": sampler,
            "height": None,
            "width": None,
            "negative_prompt": None,
        }
        drawn, generate_s = seconds(lambda: generate_images(model, prompts, folder, generation, args.batch, device))
        rows, clip_s = seconds(lambda: score_images(prompts, seeds, folder, encoder, None, 64))
        images = [Image.open(r["image"]).convert("RGB") for r in rows]
        verdicts, check_s = seconds(
            lambda: [judge(p.truth, finder(image)) for p, image in zip([p for p in prompts for _ in seeds], images)]
        )
        for row, verdict in zip(rows, verdicts):
            row.update(verdict)
        summary = summarise(rows, None, 1000, 0.95)["all"]
        results[sampler] = {
            "steps": steps,
            "images": drawn,
            "generate": drawn / generate_s,
            "clip": len(rows) / clip_s,
            "check": len(rows) / check_s,
            **summary,
        }

    print(
        f"\nDrawBench-style evaluation on {device}: world suite, {len(prompts)} prompts × {args.n} images, "
        f"model {model}, judge {judge_path}"
    )
    print(
        f"{'sampler':<10}{'steps':>6}{'gen img/s':>11}{'CLIPScore [95% CI]':>28}{'correct [95% CI]':>26}"
        f"{'judge img/s':>13}{'check img/s':>13}"
    )
    for sampler, r in results.items():
        clip, correct = r["clip_score"], r["correct"]
        print(
            f"{sampler:<10}{r['steps']:>6}{r['generate']:>11.1f}"
            f"{clip['mean']:>10.3f} [{clip['low']:.3f}, {clip['high']:.3f}]"
            f"{correct['mean']:>10.3f} [{correct['low']:.3f}, "
            f"{correct['high']:.3f}]{r['clip']:>13.0f}{r['check']:>13.0f}"
        )
    speedup = results["dpm"]["generate"] / results["ddim"]["generate"]
    print(
        f"DPM-Solver++ 20 steps draws {speedup:.2f}× as many images per second as DDIM 50; CLIPScore "
        f"{results['dpm']['clip_score']['mean'] - results['ddim']['clip_score']['mean']:+.3f}, correct "
        f"{results['dpm']['correct']['mean'] - results['ddim']['correct']['mean']:+.3f} (DPM − DDIM)"
    )


if __name__ == "__main__":
    main()
