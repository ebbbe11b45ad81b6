"""What a latent diffusion run shows of itself while it trains, so that a user sees conditioning emerge (or not)
in MLflow instead of learning it from a finished model:

- `ConditioningSignal`: how much of the UNet's error its caption removes, per noise level, on a fixed batch;
- `SampleGrid`: fixed prompts × fixed seeds drawn by the EMA model, every column of a row from the same noise.

Both run on every rank (the UNet's forward is collective under FSDP) and log from rank 0.
"""

from __future__ import annotations

import json
import os

import pytorch_lightning as pl
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageDraw

from training.diffusion.export import gather_pipeline, image_grid
from training.diffusion.unet import encode_text


class ConditioningSignal(pl.Callback):
    """Every `every_n_steps` (from step 0), on the first `samples` captioned images of the data (unaugmented, the
    posterior's mode, the same noise each time), at each of `timesteps`, the EMA UNet predicts with the caption
    and with the empty caption:

    - `conditioning/gain_t<t>`: 1 − MSE(conditional) / MSE(unconditional) against the training target, the share
      of the error that the text removes. 0 for a UNet that ignores its text, and also for a fresh one, whose
      random dependence on the text helps nothing; it grows as the UNet learns to use the caption.
    - `conditioning/t<t>`: ‖ε(x_t, c) − ε(x_t, ∅)‖ / ‖ε‖, how far the text moves the prediction, relative to the
      noise drawn (a fresh UNet already scores ≈ 0.07 here: size is not use, hence the gain).

    `conditioning/gain` and `conditioning/mean` average them over the timesteps; the history goes to
    `<default_root_dir>/conditioning.json`."""

    def __init__(
        self, every_n_steps: int = 100, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), samples: int = 16
    ):
        self.every_n_steps, self.timesteps, self.samples = int(every_n_steps), [int(t) for t in timesteps], int(samples)
        self.history: list[dict] = []
        self._fixed = None

    @torch.no_grad()
    def _fixed_inputs(self, trainer, pl_module):
        if self._fixed is None:
            batch = next(iter(trainer.datamodule.preview(1)))
            if "latent_moments" in batch:
                latents, states = DiagonalGaussianDistribution(batch["latent_moments"]).mode(), batch["text_states"]
            else:
                pixels = batch["pixel_values"].to(pl_module.device)
                latents = pl_module.vae.encode(pixels).latent_dist.mode()
                states = encode_text(pl_module.text_encoder, pl_module.tokenizer, batch["captions"])
            latents = (latents[: self.samples] * pl_module.scaling_factor).to(pl_module.device)
            states = states[: self.samples].to(pl_module.device)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(pl_module.device)
            self._fixed = latents, states, noise
        return self._fixed

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, float]:
        latents, states, noise = self._fixed_inputs(trainer, pl_module)
        empty = pl_module.null_states.to(states.dtype).expand_as(states)
        schedule = pl_module.schedule
        differences, gains = {}, {}
        for t in self.timesteps:
            steps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
            noisy = schedule.add_noise(latents, noise, steps)
            v = schedule.config.prediction_type == "v_prediction"
            target = (schedule.get_velocity(latents, noise, steps) if v else noise).float()
            conditional = pl_module.ema(noisy, steps, encoder_hidden_states=states).sample.float()
            unconditional = pl_module.ema(noisy, steps, encoder_hidden_states=empty).sample.float()
            moved = (conditional - unconditional).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
            differences[f"t{t}"] = float(moved.mean())
            error = (conditional - target).pow(2).mean() / (unconditional - target).pow(2).mean()
            gains[f"gain_t{t}"] = float(1 - error)
        return {
            **differences,
            **gains,
            "mean": sum(differences.values()) / len(differences),
            "gain": sum(gains.values()) / len(gains),
        }

    def _record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        entry = self.measure(trainer, pl_module)
        self.history.append({"step": step, **entry})
        if trainer.is_global_zero:
            if trainer.logger:
                trainer.logger.log_metrics({f"conditioning/{k}": v for k, v in entry.items()}, step=step)
            with open(os.path.join(trainer.default_root_dir, "conditioning.json"), "w") as f:
                json.dump(self.history, f, indent=2)

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)


def _labelled(grid: Image.Image, labels: list[str], cell: int) -> Image.Image:
    """The grid under a strip naming each column (its prompt, shortened to fit)."""
    strip = 12 * 3
    out = Image.new("RGB", (grid.width, grid.height + strip), "white")
    out.paste(grid, (0, strip))
    draw = ImageDraw.Draw(out)
    chars = max(4, cell // 6)
    for column, label in enumerate(labels):
        words, lines = (label or "(empty prompt)").split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > chars and lines[-1]:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        for row, line in enumerate(lines[:3]):
            draw.text((column * cell + 2, row * 12), line, fill="black")
    return out


class SampleGrid(pl.Callback):
    """Every `every_n_steps` and at the end, the EMA model draws each of `prompts` (plus the empty prompt, the
    last column, when `empty_column`) from each of `seeds`: one row per seed, every column of a row from the
    same initial noise, so what differs along a row is what the text changed. The grid goes to MLflow as the
    image series `samples` (the run page's slider over steps) and, at the end, to `<default_root_dir>/<save_as>`."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        steps: int = 20,
        guidance_scale: float = 5.0,
        sampler: str = "dpm",
        seeds: list[int] | None = None,
        seed: int = 0,
        empty_column: bool = False,
        save_as: str | None = "samples.png",
        upscale: int = 2,
    ):
        self.prompts = list(prompts) + ([""] if empty_column else [])
        self.every_n_steps, self.steps, self.guidance_scale = int(every_n_steps), int(steps), float(guidance_scale)
        self.sampler, self.seeds = sampler, [int(s) for s in (seeds if seeds is not None else [seed])]
        self.save_as, self.upscale = save_as, int(upscale)
        self._drawn_at: int | None = None
        self._grid: Image.Image | None = None

    @torch.no_grad()
    def draw(self, trainer, pl_module) -> Image.Image | None:
        pipeline = gather_pipeline(trainer, pl_module, self.sampler)
        if pipeline is None:
            return None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(pl_module.device)
        images = []
        for seed in self.seeds:
            generators = [torch.Generator(pl_module.device).manual_seed(seed) for _ in self.prompts]
            images += pipeline(
                self.prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, generator=generators
            ).images
        if self.upscale > 1:  # 32 px cells are too small to judge by eye
            images = [
                i.resize((i.width * self.upscale, i.height * self.upscale), Image.Resampling.NEAREST) for i in images
            ]
        grid = image_grid(images, columns=len(self.prompts))
        return _labelled(grid, self.prompts, images[0].width) if len(self.seeds) > 1 or len(self.prompts) > 1 else grid

    def _log(self, trainer, pl_module, final: bool) -> None:
        step = trainer.global_step
        if step != self._drawn_at:  # the end of a run that just drew at its last step reuses that grid
            self._drawn_at, self._grid = step, self.draw(trainer, pl_module)
            if self._grid is not None and trainer.logger and trainer.logger.experiment:
                trainer.logger.experiment.log_image(self._grid, key="samples", step=step)
        if final and self.save_as and self._grid is not None:
            self._grid.save(os.path.join(trainer.default_root_dir, self.save_as))
        trainer.strategy.barrier("samples")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module, final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, final=True)
