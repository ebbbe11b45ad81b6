"""What leaves a diffusion run: the autoencoder as an `AutoencoderKL` folder (with the latent scale measured
on the data), the text-to-image model as a diffusers pipeline folder that `StableDiffusionPipeline
.from_pretrained` opens, and sample grids for fixed prompts in MLflow while training runs. Folders are
replaced atomically, so a reader never sees half of one."""

from __future__ import annotations

import os
import shutil

import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from training.autoencoder import latent_scale
from training.diffusion import sampler
from training.export import full_state_dict


def replace_folder(folder: str, save) -> None:
    """`save(staging)` writes the folder's new content; it then takes the place of the old one."""
    staging = f"{folder}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save(staging)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(staging, folder)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, schedule, sampler_name: str = "dpm") -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sampler(sampler_name, schedule), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def gather_pipeline(trainer: pl.Trainer, pl_module, sampler_name: str = "dpm") -> StableDiffusionPipeline | None:
    """The EMA weights (gathered from shards under FSDP) in a pipeline on rank 0's CPU; None elsewhere.
    Every rank must call it."""
    state = full_state_dict(pl_module.ema)
    if not trainer.is_global_zero:
        return None
    unet = UNet2DConditionModel.from_config(pl_module.unet.config)
    unet.load_state_dict(state)
    return assemble_pipeline(unet.eval(), pl_module.vae, pl_module.text_encoder, pl_module.tokenizer,
                             pl_module.schedule, sampler_name)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class ExportPipeline(pl.Callback):
    """`<output>/pipeline` after every validation and at the end: unet (EMA weights), vae, text_encoder,
    tokenizer, scheduler, model_index.json."""

    def __init__(self, folder: str, sampler: str = "dpm"):
        self.folder, self.sampler = folder, sampler

    def export(self, trainer, pl_module) -> None:
        pipeline = gather_pipeline(trainer, pl_module, self.sampler)
        if pipeline is not None:
            replace_folder(self.folder, pipeline.save_pretrained)
        trainer.strategy.barrier("export")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)


class ExportVae(pl.Callback):
    """`<output>/vae` at the end of training (and after each validation): the autoencoder with its
    `scaling_factor` set to 1/std of its latents on up to `scale_batches` batches of the data."""

    def __init__(self, folder: str, datamodule, scale_batches: int = 16):
        self.folder, self.datamodule, self.scale_batches = folder, datamodule, int(scale_batches)
        self.scaling_factor: float | None = None

    def export(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            vae = pl_module.vae
            was_training = vae.training
            vae.eval()
            self.scaling_factor = latent_scale(vae, self.datamodule.preview(self.scale_batches), self.scale_batches)
            vae.register_to_config(scaling_factor=self.scaling_factor)
            replace_folder(self.folder, vae.save_pretrained)
            vae.train(was_training)
            print(f"latent scale factor (1/std over {self.scale_batches} batches at most): {self.scaling_factor:.5f}")
            if trainer.logger:
                trainer.logger.log_metrics({"vae/scaling_factor": self.scaling_factor}, step=trainer.global_step)
        trainer.strategy.barrier("export")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)


class SampleGrid(pl.Callback):
    """Every `every_n_steps`, the EMA model draws `prompts` (fixed seed, same noise each time) and the grid
    goes to MLflow as the image series `samples` (the run page's slider over steps)."""

    def __init__(self, prompts: list[str], every_n_steps: int = 500, steps: int = 20, guidance_scale: float = 5.0,
                 sampler: str = "dpm", seed: int = 0):
        self.prompts, self.every_n_steps = list(prompts), int(every_n_steps)
        self.steps, self.guidance_scale, self.sampler, self.seed = int(steps), float(guidance_scale), sampler, int(seed)
        self.last: Image.Image | None = None
        self._drawn_at: int | None = None

    @torch.no_grad()
    def draw(self, trainer, pl_module) -> Image.Image | None:
        pipeline = gather_pipeline(trainer, pl_module, self.sampler)
        if pipeline is None:
            return None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(pl_module.device)
        images = pipeline(self.prompts, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                          generator=torch.Generator(pl_module.device).manual_seed(self.seed)).images
        return image_grid(images, columns=min(len(images), 8))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._drawn_at:
            return
        self._drawn_at = step
        self.last = self.draw(trainer, pl_module)
        if self.last is not None and trainer.logger:
            trainer.logger.experiment.log_image(trainer.logger.run_id, self.last, key="samples", step=step)
        trainer.strategy.barrier("samples")
