"""What leaves a diffusion run: the autoencoder as an `AutoencoderKL` folder (with the latent scale measured
on the data), the text-to-image model as a diffusers pipeline folder that `StableDiffusionPipeline
.from_pretrained` opens, and sample grids for fixed prompts in MLflow while training runs. Folders are
replaced atomically, so a reader never sees half of one."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from training.diffusion.autoencoder import latent_scale
from training.diffusion.unet import sampler
from training.export import FolderExport, full_state_dict


def assemble_pipeline(
    unet, vae, text_encoder, tokenizer, schedule, sampler_name: str = "dpm"
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampler(sampler_name, schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def gather_pipeline(trainer: pl.Trainer, pl_module, sampler_name: str = "dpm") -> StableDiffusionPipeline | None:
    """The EMA weights (gathered from shards under FSDP) in a pipeline on rank 0's CPU; None elsewhere.
    Every rank must call it."""
    state = full_state_dict(pl_module.ema)
    if not trainer.is_global_zero:
        return None
    unet = UNet2DConditionModel.from_config(pl_module.unet.config)
    unet.load_state_dict(state)
    return assemble_pipeline(
        unet.eval(), pl_module.vae, pl_module.text_encoder, pl_module.tokenizer, pl_module.schedule, sampler_name
    )


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


class ExportPipeline(FolderExport):
    """`<output>/pipeline`: unet (EMA weights), vae, text_encoder, tokenizer, scheduler, model_index.json."""

    def __init__(self, folder: str, sampler: str = "dpm"):
        super().__init__(folder)
        self.sampler = sampler

    def saver(self, trainer, pl_module):
        pipeline = gather_pipeline(trainer, pl_module, self.sampler)
        return None if pipeline is None else pipeline.save_pretrained


class ExportVae(FolderExport):
    """`<output>/vae`: the autoencoder with its `scaling_factor` set to 1/std of its latents on up to
    `scale_batches` batches of the data (measured again at every export: the weights moved)."""

    def __init__(self, folder: str, datamodule, scale_batches: int = 16):
        super().__init__(folder)
        self.datamodule, self.scale_batches = datamodule, int(scale_batches)

    def saver(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return None  # no FSDP for the autoencoder: rank 0 holds the whole model
        vae = pl_module.vae
        was_training = vae.training
        scale = latent_scale(vae.eval(), self.datamodule.preview(self.scale_batches), self.scale_batches)
        vae.train(was_training)
        vae.register_to_config(scaling_factor=scale)
        print(f"latent scale factor (1/std over {self.scale_batches} batches at most): {scale:.5f}")
        if trainer.logger:
            trainer.logger.log_metrics({"vae/scaling_factor": scale}, step=trainer.global_step)
        return vae.save_pretrained


class SampleGrid(pl.Callback):
    """Every `every_n_steps`, the EMA model draws `prompts` (fixed seed, same noise each time) and the grid
    goes to MLflow as the image series `samples` (the run page's slider over steps)."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        steps: int = 20,
        guidance_scale: float = 5.0,
        sampler: str = "dpm",
        seed: int = 0,
    ):
        self.prompts, self.every_n_steps = list(prompts), int(every_n_steps)
        self.steps, self.guidance_scale, self.sampler, self.seed = int(steps), float(guidance_scale), sampler, int(seed)
        self._drawn_at: int | None = None

    @torch.no_grad()
    def draw(self, trainer, pl_module) -> Image.Image | None:
        pipeline = gather_pipeline(trainer, pl_module, self.sampler)
        if pipeline is None:
            return None
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(pl_module.device)
        images = pipeline(
            self.prompts,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=torch.Generator(pl_module.device).manual_seed(self.seed),
        ).images
        return image_grid(images, columns=min(len(images), 8))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._drawn_at:
            return
        self._drawn_at = step
        grid = self.draw(trainer, pl_module)
        if grid is not None and trainer.logger and trainer.logger.experiment:
            trainer.logger.experiment.log_image(grid, key="samples", step=step)
        trainer.strategy.barrier("samples")
