"""The latent cache names its encoders: its manifest holds fingerprints of the VAE, text encoder and tokenizer
it was made with, they move with the weights and the stage's identity with them; `task=ldm` refuses a cache of
another VAE or text encoder in one line before training, and trains on a matching one. On a GPU the encoders
run in bf16 autocast, close to fp32."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.encode.run import EncodeStage, ShardEncoder, encode, resolve_device
from pipeline.errors import StageError
from pipeline.world.shards import write_world_shards
from support import stage_config
from training.data.transforms import EvalTransform
from training.diffusion.autoencoder import SYMMETRIC_MEAN, SYMMETRIC_STD, load_vae
from training.diffusion.cache_check import check_cache, encoder_fingerprints, model_fingerprint
from training.diffusion.unet import load_text_encoder
from training.errors import UserError
from training.train import train

FIXED = ["data.num_workers=0", "data.shuffle_buffer=0", "data.crop_scale=[1,1]", "trainer.enable_progress_bar=false"]
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _encode_config(cache: dict, output: str, *overrides: str) -> dict:
    cfg = stage_config(
        "encode",
        f"input={cache['shards']}",
        f"output={output}",
        f"vae={cache['vae']}",
        f"clip={cache['clip']}",
        "progress=false",
        "ray.num_cpus=1",
        "processes=1",  # one actor: each imports torch, diffusers and transformers (seconds on 2 cores)
        *overrides,
    )
    return OmegaConf.to_container(cfg, resolve=True)


def _other_vae(source: str, folder: str) -> str:
    """A copy of the VAE at `source` with one encoder weight changed, saved into `folder`."""
    vae = load_vae(source)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.5
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ray_local):
    """Four world images in one shard, an untrained tiny VAE and CLIP (the fingerprints do not care whether
    they are trained), and the cache `pipeline.encode` makes of them."""
    from training.clip.model import ClipBundle, image_processor_for, save_clip
    from training.data.datamodule import ShardDataModule
    from training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("latent_cache")
    shards = write_world_shards(root / "shards", 4, 4, image_size=32)
    tokenizer = train_tokenizer(ShardDataModule(shards).captions(), vocab_size=300, max_length=32)
    torch.manual_seed(0)
    clip = instantiate(stage_config("train", "model=clip_tiny").model, tokenizer=tokenizer)
    save_clip(f"{root}/clip", ClipBundle(clip, tokenizer, image_processor_for(32)))
    instantiate(stage_config("train", "task=vae", "model=vae_tiny").model).save_pretrained(f"{root}/vae")
    made = {"root": root, "shards": shards, "vae": f"{root}/vae", "clip": f"{root}/clip", "output": f"{root}/cache"}
    made["manifest"] = encode(_encode_config(made, made["output"]))
    return made


def test_the_manifest_holds_fingerprints_that_follow_the_weights(cache, tmp_path):
    manifest = cache["manifest"]
    assert manifest["counts"] == {"samples": 4, "errors": 0, "shards": 1}
    assert manifest["encoded_with"] == (["cuda/bf16"] if torch.cuda.is_available() else ["cpu/fp32"])
    fingerprints = manifest["fingerprints"]
    assert set(fingerprints) == {"vae", "text_encoder", "tokenizer"}
    assert all(len(f) == 16 and int(f, 16) >= 0 for f in fingerprints.values())
    # The same folders, loaded again: the same fingerprints, and the same identity (a rerun has nothing to do).
    again = encoder_fingerprints(load_vae(cache["vae"]), *load_text_encoder(cache["clip"]))
    assert again == fingerprints
    assert EncodeStage(_encode_config(cache, cache["output"])).identity == manifest["identity"]
    # A different VAE exported into the same folder: its fingerprint, and so the identity, changes …
    vae = f"{tmp_path}/vae"
    shutil.copytree(cache["vae"], vae)
    copy = {**cache, "vae": vae}
    before = EncodeStage(_encode_config(copy, f"{tmp_path}/out")).identity
    _other_vae(cache["vae"], vae)
    changed = EncodeStage(_encode_config(copy, f"{tmp_path}/out"))
    assert changed.fingerprints["vae"] != fingerprints["vae"] and changed.identity != before
    assert {k: v for k, v in changed.fingerprints.items() if k != "vae"} == {
        k: v for k, v in fingerprints.items() if k != "vae"
    }
    # … and a finished cache of the old one is not taken as done: the rerun stops before encoding anything.
    shutil.copytree(cache["output"], f"{tmp_path}/out")
    with pytest.raises(StageError, match="overwrite=true"):
        encode(_encode_config(copy, f"{tmp_path}/out"))


def _ldm_config(cache: dict, output: str, vae: str, *overrides: str):
    return stage_config(
        "train",
        "task=ldm",
        f"data.path={cache['output']}",
        f"vae={vae}",
        f"clip={cache['clip']}",
        f"output={output}",
        "data.batch_size=4",
        "tracking=false",
        "checkpoint_every=1000",
        *FIXED,
        *overrides,
    )


def test_ldm_refuses_a_cache_of_another_vae_in_one_line_before_training(cache, tmp_path):
    other = _other_vae(cache["vae"], f"{tmp_path}/other_vae")
    with pytest.raises(UserError) as refused:
        train(_ldm_config(cache, f"{tmp_path}/run", other, "trainer.max_steps=1"))
    message = str(refused.value)
    print(message)
    cached, given = cache["manifest"]["fingerprints"]["vae"], model_fingerprint(load_vae(other))
    assert "\n" not in message and f"data.path={cache['output']}" in message
    assert "another VAE:" in message and cached in message and given in message and f"vae={other}" in message
    assert "text encoder" not in message  # the CLIP is the cache's own
    assert not os.path.exists(f"{tmp_path}/run/checkpoints") and not os.path.exists(f"{tmp_path}/run/pipeline")


def test_check_cache_names_a_changed_text_encoder_and_passes_old_caches(cache, tmp_path):
    vae = load_vae(cache["vae"])
    text_encoder, tokenizer = load_text_encoder(cache["clip"])
    data, cfg = {"path": cache["output"], "val_path": None}, {"vae": cache["vae"], "clip": "/elsewhere/clip"}
    check_cache(data, cfg, vae, text_encoder, tokenizer)  # the cache's own models: passes
    with torch.no_grad():
        next(text_encoder.parameters()).add_(0.1)
    with pytest.raises(UserError, match=r"another text encoder: text encoder fingerprint \w{16} in the cache .*"):
        check_cache(data, cfg, vae, text_encoder, tokenizer)
    # A cache from before fingerprints were recorded cannot be checked: a warning, not a refusal.
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text('{"stage": "encode", "config": {}}')
    check_cache({"path": str(old)}, cfg, vae, text_encoder, tokenizer)


def test_ldm_trains_a_step_on_a_matching_cache(cache, tmp_path):
    train(_ldm_config(cache, f"{tmp_path}/run", cache["vae"], "trainer.max_steps=1"))
    assert os.path.exists(f"{tmp_path}/run/pipeline/unet/diffusion_pytorch_model.safetensors")


def test_device_and_precision_resolve_from_the_cluster():
    assert resolve_device("auto", "auto", 0) == ("cpu", "fp32")
    assert resolve_device("auto", "auto", 2) == ("cuda", "bf16")
    assert resolve_device("cpu", "auto", 2) == ("cpu", "fp32")
    assert resolve_device("auto", "fp32", 1) == ("cuda", "fp32")
    with pytest.raises(StageError, match="device=cuda"):
        resolve_device("cuda", "auto", 0)
    with pytest.raises(StageError, match="precision='fp16'"):
        EncodeStage(_encode_config({"shards": "s", "vae": "v", "clip": "c"}, "o", "precision=fp16"))


@on_gpu
def test_bf16_encoding_on_the_gpu_is_close_to_fp32(cache):
    samples = list(wds.WebDataset(f"{cache['shards']}/00000.tar", shardshuffle=False).decode("pil"))
    transform = EvalTransform(32, SYMMETRIC_MEAN, SYMMETRIC_STD)
    pixels, captions = torch.stack([transform(s["jpg"]) for s in samples]), [s["txt"] for s in samples]
    cfg = _encode_config(cache, cache["output"])
    encoded = {
        precision: ShardEncoder({**cfg, "device": "cuda", "precision": precision}).encode_batch(pixels, captions)
        for precision in ("bf16", "fp32")
    }
    for index, name in enumerate(("latent moments", "text states")):
        low, full = torch.from_numpy(encoded["bf16"][index]), torch.from_numpy(encoded["fp32"][index])
        assert low.dtype == torch.float32 and low.shape == full.shape
        error = float((low - full).norm() / full.norm())
        print(f"{name}: bf16 vs fp32 relative error {error:.4f}")
        assert error < 0.03, name  # bf16 keeps 8 bits of mantissa: ≈0.4% per operation, a few % at most here
