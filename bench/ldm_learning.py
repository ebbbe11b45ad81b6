"""Does the demo's text-to-image model follow its prompts? Recipes side by side on a finished demo's data
(`python bench/ldm_learning.py --demo data/demo [--only NAME …]`).

Each recipe trains the autoencoder and the latent diffusion UNet as the demo does (conf/experiment/demo_vae,
demo_ldm, plus the recipe's overrides) on the demo's CLIP-filtered shards, conditioned on its CLIP v1, then:
- the autoencoder's round trip of 300 held-out world scenes through the world checkers (the LDM's ceiling);
- the conditioning gain of the EMA UNet at the end of training (the share of its error that the caption removes);
- the world suite judged by the ground-truth checkers, beside the same model's empty-prompt images judged
  against the same prompts: as the demo (10 prompts per category, 2 seeds), or `--prompts 20 --seeds 4` for 80
  images a category, where 20 leave a difference of 2 images inside the noise.
A recipe whose autoencoder is the same as an earlier one's reuses it; `--vae FOLDER` (an earlier run's `vae`
folder, holding round_trip.json) reuses that one for every recipe.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

from curate import ROOT, config  # bench/ is the script's folder

from evaluation.run import evaluate
from training.train import train

RECIPES = {  # name → (autoencoder overrides, UNet overrides), on top of the demo's presets
    "demo": ([], []),
    # diffusers' `attention_head_dim` is the number of heads: the demo's 8 are heads of 4 channels at 32.
    "2_heads": ([], ["model.attention_head_dim=2"]),
    "2_heads_attend_both_levels": ([], ["model.attention_head_dim=2", "model.cross_attention_blocks=[true,true]"]),
    "3000_steps": ([], ["trainer.max_steps=3000"]),  # the demo's budget leaves room for ~200 s more of UNet
}
CATEGORIES = ("Colors", "Counting", "Positional")


def filter_of(demo: str, shards: str) -> dict:
    with open(f"{demo}/selection/{os.path.basename(shards)}/manifest.json") as f:
        return json.load(f)["config"]["filter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=os.path.join(ROOT, "data", "demo"), help="a finished demo's output")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "ldm_learning"))
    parser.add_argument("--vae", help="an earlier run's autoencoder folder, reused by every recipe")
    parser.add_argument("--prompts", type=int, default=10, help="world-suite prompts per category")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    args = parser.parse_args()
    demo = os.path.abspath(args.demo)
    shards = [  # the demo's CLIP-filtered shards: those whose filter ran the clip_score rule
        path for path in sorted(glob.glob(f"{demo}/shards/*")) if "clip_score" in filter_of(demo, path)
    ]
    if not shards:
        raise SystemExit(f"--demo {demo} holds no CLIP-filtered shards: run make demo first")
    shards = shards[-1]
    quiet = ["tracking=false", "data.num_workers=0"]
    rows, autoencoders = [], {}
    if args.vae:
        autoencoders = {json.dumps(vae): os.path.abspath(args.vae) for vae, _ in RECIPES.values()}
    for name, (vae_overrides, ldm_overrides) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        out = f"{args.out}/{name}"
        began = time.perf_counter()
        key = json.dumps(vae_overrides)
        if key not in autoencoders:
            train(
                config(
                    "train",
                    "+experiment=demo_vae",
                    f"data.path={shards}",
                    f"output={out}/vae",
                    "+callbacks.round_trip._target_=evaluation.t2i.round_trip.RoundTripCallback",
                    f"+callbacks.round_trip.dataset={demo}/eval/colour",
                    *quiet,
                    *vae_overrides,
                )
            )
            autoencoders[key] = f"{out}/vae"
        vae = autoencoders[key]
        train(
            config(
                "train",
                "+experiment=demo_ldm",
                f"data.path={shards}",
                f"output={out}/ldm",
                f"vae={vae}/vae",
                f"clip={demo}/clip_v1/clip",
                "~callbacks.samples",
                *quiet,
                *ldm_overrides,
            )
        )
        seconds = time.perf_counter() - began
        bench = evaluate(
            config(
                "evaluate",
                "+experiment=demo_drawbench",
                f"pipeline={out}/ldm/pipeline",
                f"judge={demo}/clip_v0/clip",
                f"output={out}/drawbench",
                "tracking=false",
                f"world_suite.per_category={args.prompts}",
                f"generation.n={args.seeds}",
            )
        )
        round_trip = json.load(open(f"{vae}/round_trip.json"))["round_trip"]["correct"]
        signal = json.load(open(f"{out}/ldm/conditioning.json"))[-1]["gain"]
        categories = bench["categories"]
        cells = {}
        for c in CATEGORIES:
            cells[c] = (categories[c]["correct"]["mean"], categories[c]["empty_prompt_correct"]["mean"])
        rows.append((name, round_trip, signal, cells, seconds))

    header = " | ".join(f"{c} (empty)" for c in CATEGORIES)
    print(f"\n| recipe | round trip | conditioning gain | {header} | train s |")
    print("|---|---:|---:|" + "---:|" * len(CATEGORIES) + "---:|")
    for name, round_trip, signal, cells, seconds in rows:
        scores = " | ".join(f"{cells[c][0]:.2f} ({cells[c][1]:.2f})" for c in CATEGORIES)
        print(f"| {name} | {round_trip:.3f} | {signal:.3f} | {scores} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
