"""Latent diffusion end to end on world images: the autoencoder overfits a few images and exports its
latent scale; the UNet overfits four captioned images so that sampling their captions draws them back; the
pipeline folder opens in diffusers; cached latents give the same loss; kill -9 resumes; DDP and FSDP run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from evaluation.t2i.round_trip import round_trip_scores, world_scenes
from pipeline.encode.run import encode
from pipeline.eval_set.export import export_eval_set
from pipeline.world.shards import write_world_shards
from support import ROOT, assert_refused_in_one_line, kill_then_resume, stage_config, subprocess_env
from training.data.transforms import EvalTransform
from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, psnr
from training.errors import UserError
from training.train import train

FIXED = ["data.num_workers=0", "data.shuffle_buffer=0", "data.crop_scale=[1,1]", "trainer.enable_progress_bar=false"]


def _images(shards: str):
    """(captions, pixels in [-1, 1]) of the first shard, in order."""
    samples = list(wds.WebDataset(f"{shards}/00000.tar", shardshuffle=False).decode("pil"))
    transform = EvalTransform(32, SYMMETRIC_MEAN, SYMMETRIC_STD)
    return [s["txt"] for s in samples], torch.stack([transform(s["jpg"]) for s in samples])


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four captioned world images (32 px) and an autoencoder overfitted on them (300 steps, ≈20 s)."""
    root = tmp_path_factory.mktemp("ldm")
    shards = write_world_shards(root / "shards", 4, 4, image_size=32)
    scenes = f"{root}/scenes"  # held-out world scenes with their truth, for the round trip through the checkers
    export_eval_set(stage_config("eval_set", f"output={scenes}", "n=40"))
    train(
        stage_config(
            "train",
            "task=vae",
            f"data.path={shards}",
            f"output={root}/vae_run",
            "data.batch_size=4",
            "trainer.max_steps=300",
            "module.optimizer.lr=2e-3",
            "module.warmup_steps=10",
            "checkpoint_every=1000",
            "tracking=false",
            *FIXED,
            "+callbacks.round_trip._target_=evaluation.t2i.round_trip.RoundTripCallback",
            f"+callbacks.round_trip.dataset={scenes}",
        )
    )
    return {"root": root, "shards": shards, "vae": f"{root}/vae_run/vae", "scenes": scenes}


def test_round_trip_through_the_world_checkers(four):
    """The checkers pass the originals at the autoencoder's size; an autoencoder that draws nothing passes
    none; the round trip of one that saw four images lies in between, and the training run wrote it."""
    scenes = world_scenes(four["scenes"])
    assert len(scenes) == 40 and all(set(t["checks"]) == {"colour", "count", "position"} for _, t in scenes)
    vae = AutoencoderKL.from_pretrained(four["vae"])
    scores = round_trip_scores(vae, scenes, batch_size=16)
    print("round trip", scores)
    assert scores["scenes"] == 40 and scores["original"]["correct"] >= 0.95
    assert 0.0 <= scores["round_trip"]["correct"] <= 1.0
    written = json.load(open(f"{four['root']}/vae_run/round_trip.json"))
    assert written["step"] == 300 and written["round_trip"] == pytest.approx(scores["round_trip"])
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.fill_(0.2)  # a flat light-grey picture, whatever the latents
    blank = round_trip_scores(vae, scenes, batch_size=16)
    assert blank["round_trip"] == {"colour": 0.0, "count": 0.0, "position": 0.0, "correct": 0.0}
    assert not vae.training  # left as found (from_pretrained: eval mode)
    shutil.rmtree(f"{four['root']}/no_truth", ignore_errors=True)
    os.makedirs(f"{four['root']}/no_truth/test")
    with wds.TarWriter(f"{four['root']}/no_truth/test/0.tar") as sink:
        sink.write({"__key__": "a", "jpg": b"not read", "cls": b"0"})  # a classification set: no scene
    open(f"{four['root']}/no_truth/test/nshards.txt", "w").write("1\n")
    with pytest.raises(UserError, match="has no .json scene"):
        world_scenes(f"{four['root']}/no_truth")


def test_autoencoder_overfits_and_exports_its_latent_scale(four):
    """Threshold 26 dB: an RMS error of 5% of the range, and 7 dB above painting each image its mean colour
    (≈19 dB on these flat shapes and soft backgrounds). Measured after 300 steps: ≈30 dB."""
    vae = AutoencoderKL.from_pretrained(four["vae"]).eval()
    _, pixels = _images(four["shards"])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
    score = float(psnr(reconstruction, pixels))
    flat = float(psnr(pixels.mean((2, 3), keepdim=True).expand_as(pixels), pixels))
    print(f"autoencoder PSNR {score:.2f} dB (mean-colour baseline {flat:.2f} dB)")
    assert score >= 26.0 and score >= flat + 7.0
    # The exported scale factor is 1/std of its latents on these images (within the posterior's sampling noise).
    std = float(torch.cat([posterior.sample() for _ in range(8)]).std())
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.05)


def test_unet_overfits_four_captions_and_the_pipeline_draws_them_back(four, tiny_clip, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    captions, pixels = _images(four["shards"])
    train(
        stage_config(
            "train",
            "task=ldm",
            f"data.path={four['shards']}",
            f"vae={four['vae']}",
            f"clip={tiny_clip}",
            f"output={tmp_path}/run",
            "data.batch_size=4",
            "trainer.max_steps=800",
            "module.optimizer.lr=1e-3",
            "module.warmup_steps=20",
            "module.ema_decay=0.99",
            "checkpoint_every=10000",
            *FIXED,
            "+callbacks.samples._target_=training.diffusion.monitors.SampleGrid",
            f"+callbacks.samples.prompts=[{captions[0]}]",
            "+callbacks.samples.every_n_steps=400",
            "+callbacks.samples.steps=5",
            "+callbacks.samples.empty_column=true",
            "+callbacks.samples.seeds=[0,1]",
            "+callbacks.conditioning._target_=training.diffusion.monitors.ConditioningSignal",
            "+callbacks.conditioning.every_n_steps=200",
        )
    )
    # The conditioning signal, logged from step 0: the text removes none of a fresh UNet's error; it removes
    # a clear share once the UNet tells four captions apart.
    signal = json.load(open(f"{tmp_path}/run/conditioning.json"))
    print("conditioning gain by step:", [(e["step"], round(e["gain"], 4), round(e["mean"], 4)) for e in signal])
    assert [e["step"] for e in signal] == [0, 200, 400, 600, 800]
    assert abs(signal[0]["gain"]) <= 0.02 and signal[-1]["gain"] >= 0.1
    assert signal[-1]["gain"] > signal[1]["gain"]
    grid = Image.open(f"{tmp_path}/run/samples.png")  # 2 seeds × (caption, empty prompt), 2× upscaled, labelled
    assert grid.width == 2 * 64 and grid.height > 2 * 64
    pipeline = StableDiffusionPipeline.from_pretrained(f"{tmp_path}/run/pipeline")  # offline, from the folder alone
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        target = pipeline.vae.decode(pipeline.vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)

        def sample(prompts):  # in [-1, 1], every image from the same noise (seed 0)
            generators = [torch.Generator().manual_seed(0) for _ in prompts]
            out = pipeline(prompts, num_inference_steps=50, guidance_scale=5.0, output_type="pt", generator=generators)
            return out.images * 2 - 1

        drawn, unconditional = sample(captions), sample([""])
    assert drawn.shape == (4, 3, 32, 32)  # the configured image size
    # The same noise with and without a caption. Without one the model draws one of its four images (which one
    # depends on the noise), so at most one caption's drawing may coincide with it; the others lie far apart.
    # (With noise i for caption i, the empty prompt drew the caption's own image for 2 of 4 seeds in one run
    # in four: measured MSE 0.0003, 0.003, 0.30, 0.13.)
    apart = (drawn - unconditional).pow(2).flatten(1).mean(1)
    print("conditional vs unconditional sample MSE per caption:", apart.numpy().round(4))
    assert float(apart.mean()) >= 0.08 and int((apart >= 0.05).sum()) >= 3
    errors = (drawn[:, None] - target[None]).pow(2).flatten(2).mean(2)  # (caption, image)
    own = 10 * torch.log10(4 / errors.diag())
    print(
        "sample-to-image MSE (rows: captions)\n",
        errors.numpy().round(4),
        "\nPSNR to its own image",
        own.numpy().round(2),
    )
    # Measured: every caption draws its own image (PSNR 20–41 dB); the others are ≥ 0.12 MSE away (≤ 15 dB).
    assert errors.argmin(1).tolist() == [0, 1, 2, 3]
    assert float(own.min()) >= 17.0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-ldm").experiment_id])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert len(artifacts) >= 2  # sample grids at steps 400 and 800
    config = json.load(open(f"{tmp_path}/run/pipeline/model_index.json"))
    assert config["unet"] == ["diffusers", "UNet2DConditionModel"] and config["vae"] == ["diffusers", "AutoencoderKL"]
    lineage = json.load(open(f"{tmp_path}/run/lineage.json"))  # evaluation's default judge comes from here
    assert lineage["clip"] == os.path.abspath(tiny_clip) and lineage["vae"] == os.path.abspath(four["vae"])


def test_cached_latents_give_the_same_loss_as_encoding_on_the_fly(four, tiny_clip, tmp_path):
    from training.data.datamodule import ShardDataModule
    from training.diffusion.recipe import ldm_recipe

    cache = f"{tmp_path}/cache"
    manifest = encode(
        stage_config(
            "encode",
            f"input={four['shards']}",
            f"output={cache}",
            f"vae={four['vae']}",
            f"clip={tiny_clip}",
            "progress=false",
            "ray.num_cpus=1",
        )
    )
    assert manifest["counts"] == {"samples": 4, "errors": 0, "shards": 1}
    cfg = stage_config(
        "train",
        "task=ldm",
        f"data.path={four['shards']}",
        f"vae={four['vae']}",
        f"clip={tiny_clip}",
        f"output={tmp_path}/run",
        "data.batch_size=4",
        *FIXED,
    )
    on_the_fly = ShardDataModule(four["shards"], batch_size=4, num_workers=0, shuffle_buffer=0)
    module = ldm_recipe(cfg, on_the_fly, f"{tmp_path}/run").module
    cached = ShardDataModule(cache, batch_size=4, num_workers=0, shuffle_buffer=0)
    cached.attach(None, 32, None)
    images, latents = next(on_the_fly.preview(1)), next(cached.preview(1))
    assert images["keys"] == latents["keys"] and "pixel_values" not in latents
    losses = []
    for batch in (images, latents):
        torch.manual_seed(0)  # the same posterior draw, caption dropout, noise and timesteps
        with torch.no_grad():
            losses.append(float(module.diffusion_loss(batch)))
    print("loss on the fly vs cached:", losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "task=ldm", *overrides]


def test_ddp_and_fsdp_runs_finish_and_export(four, tiny_clip, tmp_path):
    common = [
        f"data.path={four['shards']}",
        f"vae={four['vae']}",
        f"clip={tiny_clip}",
        "data.batch_size=2",
        "trainer.max_steps=4",
        "checkpoint_every=2",
        "tracking=false",
        *FIXED,
    ]
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT / "tests")}  # the probe callback lives in tests/support.py
    for strategy in ("ddp", "fsdp"):
        probe = tmp_path / f"probe_{strategy}"
        result = subprocess.run(
            _command(
                *common,
                f"trainer={strategy}",
                f"output={tmp_path}/{strategy}",
                f"hydra.run.dir={tmp_path}/h_{strategy}",
                "+callbacks.probe._target_=support.RandomnessProbe",
                f"+callbacks.probe.folder={probe}",
            ),
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step 4, 2 process(es)" in result.stdout
        assert os.path.exists(f"{tmp_path}/{strategy}/pipeline/unet/diffusion_pytorch_model.safetensors")
        ranks = [json.load(open(probe / f"rank{r}.json")) for r in (0, 1)]
        # Identical weights (every rank built the model from the same seed) …
        assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-12), strategy
        # … and each rank its own timesteps and noise (seed + rank): W ranks are W GPUs' worth of draws.
        assert ranks[0]["timesteps"] != ranks[1]["timesteps"] and ranks[0]["noise"] != ranks[1]["noise"], strategy


def test_kill_9_then_the_same_command_resumes_to_the_same_final_step(four, tiny_clip, tmp_path):
    shards = write_world_shards(tmp_path / "shards", 32, 8, image_size=32)
    command = _command(
        f"data.path={shards}",
        f"vae={four['vae']}",
        f"clip={tiny_clip}",
        f"output={tmp_path}/run",
        "data.batch_size=4",
        "data.num_workers=2",
        "trainer.max_steps=80",
        "checkpoint_every=10",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}/hydra",
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    kill_then_resume(command, last, kill_at=20, final_step=80, env=subprocess_env(uri))
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 80
    assert any(k.startswith("ema.") for k in checkpoint["state_dict"])  # the EMA weights resume too


def test_bad_input_is_one_line_and_exit_2(four, tiny_clip, tmp_path):
    """One command as a user runs it (exit status 2, one `error:` line); the other bad inputs through
    train() in this process, which must refuse them with the one-line UserError that command prints."""
    cases = (
        (["vae=/no/such/vae", f"clip={tiny_clip}"], "vae=/no/such/vae"),
        ([f"vae={four['vae']}", "clip=/no/such/clip"], "clip=/no/such/clip"),
        ([f"vae={four['vae']}", f"clip={tiny_clip}", "image_size=30"], "image_size=30"),
    )
    (args, needle), *others = cases
    common = [f"data.path={four['shards']}", f"output={tmp_path}/bad", "tracking=false"]
    result = subprocess.run(
        _command(*common, *args, f"hydra.run.dir={tmp_path}/h"),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    for args, needle in others:
        assert_refused_in_one_line(
            lambda args=args: train(stage_config("train", "task=ldm", *common, *args, *FIXED)), needle
        )
