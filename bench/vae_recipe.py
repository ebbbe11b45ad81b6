"""The autoencoder recipes side by side at equal steps on world images (`python bench/vae_recipe.py`):

1. L1 + KL: the recipe before issue 19;
2. L1 + SSIM + KL: the weight-free perceptual term alone;
3. L1 + SSIM + KL + PatchGAN at a fixed weight 0.5 from `--disc-start` (the adversarial gradient then swamps
   the reconstruction's at the decoder's last layer);
4. L1 + SSIM + KL + PatchGAN with taming's adaptive weight (0.5 × ‖∇rec‖/‖∇adv‖): Stable Diffusion's recipe,
   task=vae's default.

Each trains through `training.train task=vae` with the same data, seed, steps and learning rate, then is scored
on held-out world images (centre crops, the posterior's mode): PSNR, SSIM, and edge sharpness (RMS Sobel
gradient of the decodes over the originals': 1 is as sharp, below is blurrier), plus training seconds.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from curate import ROOT, config  # bench/ is the script's folder

from pipeline.world.shards import write_world_shards
from training.data.datamodule import ShardDataModule
from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, edge_sharpness, load_vae, psnr
from training.diffusion.perceptual import ssim
from training.train import train

QUIET = ["trainer.enable_progress_bar=false", "tracking=false", "checkpoint_every=100000", "data.num_workers=0"]
RECIPES = {  # name → overrides of task=vae's defaults (L1 + SSIM + KL + adaptive PatchGAN)
    "L1 + KL (before)": ["module.perceptual=null", "module.discriminator=null"],
    "L1 + SSIM + KL": ["module.discriminator=null"],
    "+ PatchGAN, fixed 0.5": ["module.adaptive_discriminator_weight=false"],
    "+ PatchGAN, adaptive (SD)": [],
}


def held_out(path: str, size: int, batch: int) -> list[torch.Tensor]:
    data = ShardDataModule(path, batch_size=batch, num_workers=0, shuffle_buffer=0)
    data.attach(None, size, None, SYMMETRIC_MEAN, SYMMETRIC_STD)
    return [b["pixel_values"] for b in data.preview(10**6)]


@torch.no_grad()
def scores(vae_folder: str, batches: list[torch.Tensor]) -> dict[str, float]:
    vae = load_vae(vae_folder)
    totals, count = {"psnr": 0.0, "ssim": 0.0, "sharpness": 0.0}, 0
    for pixels in batches:
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
        n = pixels.shape[0]
        totals["psnr"] += float(psnr(decoded, pixels)) * n
        totals["ssim"] += float(ssim(decoded, pixels)) * n
        totals["sharpness"] += float(edge_sharpness(decoded, pixels)) * n
        count += n
    return {k: v / count for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="world images to train on")
    parser.add_argument("--val", type=int, default=500, help="held-out world images to score on")
    parser.add_argument("--size", type=int, default=32, help="pixels (the demo's autoencoder: 32)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--disc-start", type=int, default=None, help="default: half the steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "vae_recipe"))
    args = parser.parse_args()
    start = args.disc_start if args.disc_start is not None else args.steps // 2
    shards = write_world_shards(f"{args.out}/train", args.samples, 500, image_size=args.size)
    # Keys after the training images: other scenes of the same world.
    val = write_world_shards(f"{args.out}/val", args.val, 500, image_size=args.size, first_index=args.samples)
    batches = held_out(val, args.size, 50)
    rows = []
    for i, (name, overrides) in enumerate(RECIPES.items()):
        if args.only and name not in args.only:
            continue
        began = time.perf_counter()
        train(
            config(
                "train",
                "task=vae",
                f"model.sample_size={args.size}",
                f"data.path={shards}",
                f"output={args.out}/run{i}",
                f"data.batch_size={args.batch}",
                f"trainer.max_steps={args.steps}",
                f"module.optimizer.lr={args.lr}",
                "module.warmup_steps=10",
                f"module.discriminator_start={start}",
                "seed=0",
                *QUIET,
                *overrides,
            )
        )
        seconds = time.perf_counter() - began
        rows.append((name, scores(f"{args.out}/run{i}/vae", batches), seconds))

    print(
        f"\nautoencoder recipes, vae_tiny at {args.size} px, {args.steps} steps × {args.batch}, lr {args.lr}, "
        f"discriminator from step {start}; scored on {args.val} held-out world images"
    )
    print("| recipe | PSNR dB | SSIM | edge sharpness | train s |")
    print("|---|---:|---:|---:|---:|")
    for name, score, seconds in rows:
        print(f"| {name} | {score['psnr']:.2f} | {score['ssim']:.3f} | {score['sharpness']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
