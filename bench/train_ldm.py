"""Latent diffusion training throughput, side by side in one run (`make bench-ldm`, or `python bench/train_ldm.py`):

1. steps/s of our Lightning training (LdmTraining) vs a bare diffusers loop doing the same work (same UNet,
   frozen autoencoder and text encoder, DDPM noising, min-SNR-weighted MSE, AdamW, clipping, EMA), both fed
   the same batches from memory, so only the framework differs (target: overhead ≤ 5%);
2. steps/s of our training on latents cached by `pipeline.encode` vs encoding images and captions on the
   fly (target: ≥ 1.3×).
"""

from __future__ import annotations

import argparse
import os
import shutil

import pytorch_lightning as pl
import torch
from curate import ROOT, config  # bench/ is the script's folder
from hydra.utils import instantiate
from train_clip import StepTimer, sync

from pipeline.world.shards import write_world_shards


def prepare(out: str, samples: int, size: int, vae_model: str):
    """Shards, an untrained autoencoder and CLIP folder (speed does not depend on the weights), the cache."""
    from pipeline.encode.run import encode
    from training.clip.model import ClipBundle, image_processor_for, save_clip
    from training.data.datamodule import ShardDataModule
    from training.tokenizer import train_tokenizer

    shards = write_world_shards(f"{out}/shards", samples, samples, image_size=size)
    captions = ShardDataModule(shards).captions()
    tokenizer = train_tokenizer(captions, vocab_size=1000, max_length=32)
    clip = instantiate(config("train", "model=clip_tiny").model, tokenizer=tokenizer)
    save_clip(f"{out}/clip", ClipBundle(clip, tokenizer, image_processor_for(32)))
    instantiate(config("train", "task=vae", f"model={vae_model}", f"model.sample_size={size}").model).save_pretrained(
        f"{out}/vae"
    )
    encode(
        config(
            "encode",
            f"input={shards}",
            f"output={out}/cache",
            f"vae={out}/vae",
            f"clip={out}/clip",
            f"image_size={size}",
            "progress=false",
        )
    )
    return shards


def batches(path: str, module, size: int, batch: int, count: int) -> list[dict]:
    from training.data.datamodule import ShardDataModule
    from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD

    data = ShardDataModule(path, batch_size=batch, num_workers=0, shuffle_buffer=0)
    data.attach(module.tokenizer, size, module.tokenizer.model_max_length, SYMMETRIC_MEAN, SYMMETRIC_STD)
    first = list(data.preview(count))
    return [first[i % len(first)] for i in range(count)]


def module_for(out: str, shards: str, size: int, unet_model: str):
    from training.data.datamodule import ShardDataModule
    from training.diffusion.recipe import ldm_recipe

    cfg = config(
        "train",
        "task=ldm",
        f"model={unet_model}",
        f"data.path={shards}",
        f"vae={out}/vae",
        f"clip={out}/clip",
        f"image_size={size}",
        f"output={out}/run",
    )
    return ldm_recipe(cfg, ShardDataModule(shards), f"{out}/run").module


def lightning_rate(module, data: list[dict], warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        log_every_n_steps=10,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return (len(data) - warmup) / timer.seconds


def bare_rate(module, data: list[dict], warmup: int) -> float:
    """The same step written against diffusers directly, as its train_text_to_image example does."""
    import time

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_snr

    from training.diffusion.unet import encode_text

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet, vae, text, ema, schedule = (
        module.unet.to(device).train(),
        module.vae.to(device),
        module.text_encoder.to(device),
        module.ema.to(device),
        module.schedule,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    for step, batch in enumerate(data):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.no_grad():
            if "latent_moments" in batch:
                posterior, states = (
                    DiagonalGaussianDistribution(batch["latent_moments"].to(device)),
                    batch["text_states"].to(device),
                )
            else:
                posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
                states = encode_text(text, module.tokenizer, batch["captions"])
            latents = posterior.sample() * vae.config.scaling_factor
            dropped = torch.rand(states.shape[0], device=device) < 0.1
            states = torch.where(dropped[:, None, None], module.null_states.to(device), states)
        noise = torch.randn(latents.shape, device=device)
        steps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        prediction = unet(schedule.add_noise(latents, noise, steps), steps, encoder_hidden_states=states).sample
        snr = compute_snr(schedule, steps)
        weights = snr.clamp(max=5.0) / snr
        loss = ((prediction - noise).pow(2).flatten(1).mean(1) * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(0.9999, (1 + step) / (10 + step))
            for kept, current in zip(ema.parameters(), unet.parameters()):
                kept.lerp_(current, 1 - decay)
        float(loss)
    sync(device)
    return (len(data) - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vae", default="vae_tiny")
    parser.add_argument("--unet", default="unet_tiny")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "train_ldm"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    torch.manual_seed(0)
    shards = prepare(args.out, args.batch * 4, args.size, args.vae)
    warmup = 5
    rates: dict[str, float] = {}
    for _ in range(args.repeats):  # best of `repeats`: the least disturbed run of each
        for name, source in (
            ("bare diffusers loop", shards),
            ("ours (Lightning)", shards),
            ("ours, cached latents", f"{args.out}/cache"),
        ):
            module = module_for(args.out, shards, args.size, args.unet)
            data = batches(source, module, args.size, args.batch, args.steps)
            rate = bare_rate(module, data, warmup) if name.startswith("bare") else lightning_rate(module, data, warmup)
            rates[name] = max(rates.get(name, 0.0), rate)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nlatent diffusion training, {args.unet} + {args.vae}, {args.size} px, batch {args.batch}, {device}, "
        f"best of {args.repeats}"
    )
    print(f"{'loop':<24} {'steps/s':>8} {'samples/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<24} {rate:>8.2f} {rate * args.batch:>10.1f}")
    overhead = rates["bare diffusers loop"] / rates["ours (Lightning)"] - 1
    print(f"Lightning overhead vs bare loop: {overhead:+.1%} (target ≤ 5%)")
    print(f"cached latents speed-up: {rates['ours, cached latents'] / rates['ours (Lightning)']:.2f}× (target ≥ 1.3×)")


if __name__ == "__main__":
    main()
