"""What leaves a diffusion run: the autoencoder as an `AutoencoderKL` folder (with the latent scale measured
on the data), the text-to-image model as a diffusers pipeline folder that `StableDiffusionPipeline
.from_pretrained` opens. Folders are replaced atomically, so a reader never sees half of one. (What a run
shows of itself while it trains, sample grids and the conditioning signal, is in monitors.py.)"""

from __future__ import annotations

import pytorch_lightning as pl
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
