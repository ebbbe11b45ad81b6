"""`python -m evaluation.t2i.generate pipeline=<pipeline folder> prompt="…" [n=4 steps=25 guidance_scale=5 sampler=dpm]`

Loads any StableDiffusionPipeline folder offline and writes `<output>/<prompt index>_<image index>.png`, a
`grid.png` (one row per prompt) and `prompts.json`. Image i of a prompt is drawn with seed `seed + i`, so a
rerun, or another batch size, gives the same pictures.
"""

from __future__ import annotations

import json
import logging
import os

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from training.command_line import hydra_entry
from training.errors import UserError, run_command


def load_pipeline(path: str, sampler: str | None = None, device: str | None = None):
    from diffusers import StableDiffusionPipeline

    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise UserError(f"pipeline={path} is not a diffusers pipeline folder (no model_index.json there)")
    pipeline = StableDiffusionPipeline.from_pretrained(path)
    if sampler:
        from training.diffusion.unet import SAMPLERS

        if sampler not in SAMPLERS:
            raise UserError(f"sampler={sampler!r}; expected one of {', '.join(SAMPLERS)}")
        pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def draw(
    pipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    negative_prompt=None,
    height=None,
    width=None,
):
    """One image per (prompt, seed), each from its own generator: independent of how they are batched."""
    generators = [torch.Generator(pipeline.device).manual_seed(int(s)) for s in seeds]
    # The pipeline warns, prompt by prompt, about text past the encoder's context; callers report it once.
    logging.getLogger(type(pipeline).__module__).setLevel(logging.ERROR)
    return pipeline(
        prompts,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance_scale),
        generator=generators,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        height=height,
        width=width,
    ).images


def generate(cfg: DictConfig) -> list[str]:
    from training.diffusion.export import image_grid

    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [str(cfg.prompt)]
    if int(cfg.n) < 1:
        raise UserError(f"n={cfg.n}; expected at least one image per prompt")
    pipeline = load_pipeline(str(cfg.pipeline), cfg.sampler, cfg.device)
    jobs = [(p, i) for p in range(len(prompts)) for i in range(int(cfg.n))]
    os.makedirs(cfg.output, exist_ok=True)
    paths, images = [], []
    batches = range(0, len(jobs), int(cfg.batch_size))
    for start in tqdm(batches, desc="generate", unit="batch", disable=not cfg.get("progress", True)):
        chunk = jobs[start : start + int(cfg.batch_size)]
        drawn = draw(
            pipeline,
            [prompts[p] for p, _ in chunk],
            [int(cfg.seed) + i for _, i in chunk],
            cfg.steps,
            cfg.guidance_scale,
            cfg.negative_prompt,
            cfg.height,
            cfg.width,
        )
        for (p, i), image in zip(chunk, drawn):
            paths.append(os.path.join(cfg.output, f"{p:03d}_{i:02d}.png"))
            image.save(paths[-1])
            images.append(image)
    image_grid(images, columns=int(cfg.n)).save(os.path.join(cfg.output, "grid.png"))
    with open(os.path.join(cfg.output, "prompts.json"), "w") as f:
        json.dump(
            {
                "model": str(cfg.pipeline),
                "prompts": prompts,
                "seed": int(cfg.seed),
                "steps": int(cfg.steps),
                "guidance_scale": float(cfg.guidance_scale),
                "images": paths,
            },
            f,
            indent=2,
        )
    print(f"generated {len(paths)} images ({len(prompts)} prompts × {cfg.n}) → {cfg.output}/ (grid.png)")
    return paths


@hydra.main(version_base="1.3", config_path="../../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_command(generate, cfg)


if __name__ == "__main__":
    hydra_entry(main)
