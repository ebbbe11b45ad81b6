"""CLIP training end to end on world shards: a tiny model overfits 64 pairs; DDP and FSDP over 2 real
processes follow the single-process loss; kill -9 then the same command resumes; the export is a
transformers folder; bad input ends in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import torch
from transformers import CLIPModel

from pipeline.world.shards import write_world_shards
from support import (
    ROOT,
    assert_refused_in_one_line,
    checkpoint_step,
    kill_then_resume,
    shard_stream,
    stage_config,
    subprocess_env,
)
from training.clip.model import ContrastiveClip, load_clip
from training.data.transforms import EvalTransform
from training.train import train

# Sixty-four pairs, one shard, no shuffling or cropping: every run sees the same batches in the same order.
SAME_DATA = [
    "data.num_workers=0",
    "data.shuffle_buffer=0",
    "data.crop_scale=[1,1]",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def pairs64(tmp_path_factory):
    return write_world_shards(tmp_path_factory.mktemp("pairs64"), 64, 64, image_size=32)


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "training.train", *overrides]


def _losses(tracking_uri: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def _embed(model: CLIPModel, bundle_tokenizer, shards: str, context_length: int):
    options = dict(transform=EvalTransform(32), batch_size=64, context_length=context_length, shuffle_buffer=0)
    stream = shard_stream(shards, bundle_tokenizer, **options)
    batch = next(iter(stream))
    with torch.no_grad():
        out = model.eval()(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    return out.image_embeds, out.text_embeds


def test_tiny_clip_overfits_64_pairs_and_exports_a_transformers_folder(pairs64, tmp_path):
    out = tmp_path / "run"
    cfg = stage_config(
        "train",
        f"data.path={pairs64}",
        f"output={out}",
        "data.batch_size=64",
        "trainer.max_steps=150",
        "tracking=false",
        "module.optimizer.lr=2e-3",
        "module.warmup_steps=10",
        "module.weight_decay=0",
        "checkpoint_every=50",
        *SAME_DATA,
    )
    train(cfg)
    bundle = load_clip(str(out / "clip"))
    image, text = _embed(bundle.model, bundle.tokenizer, pairs64, bundle.context_length)
    similarity = image @ text.T
    target = torch.arange(64)
    assert (similarity.argmax(1) == target).float().mean() == 1.0  # image → text retrieval
    assert (similarity.argmax(0) == target).float().mean() == 1.0  # text → image
    # The export holds exactly the trained weights: same embeddings as the last checkpoint's model.
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)  # our own file
    assert checkpoint["global_step"] == 150
    state = {k.removeprefix("net.clip."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.clip.")}
    reference = CLIPModel(bundle.model.config)
    reference.load_state_dict(ContrastiveClip.export_state(state))
    ref_image, ref_text = _embed(reference, bundle.tokenizer, pairs64, bundle.context_length)
    assert torch.allclose(image, ref_image, atol=1e-6) and torch.allclose(text, ref_text, atol=1e-6)
    assert CLIPModel.from_pretrained(str(out / "clip")).logit_scale.exp() <= 100.0


def test_ddp_and_fsdp_follow_the_single_process_loss(pairs64, tmp_path, monkeypatch):
    """Global batch 16 for 8 steps: one process × 16 (train() in this process, as tests/test_ray_fsdp.py's
    reference), and 2 processes × 8 under DDP and FSDP2 (gloo on CPU), each a command as a user runs it.
    Each rank's share of a batch is every other sample of the single run's batch, so the global batches are
    the same sets and the loss is the same function; only float summation order differs (measured: ≤ 2e-6
    after 8 AdamW steps), so 1e-4 leaves room for other CPUs while any real mismatch (a missing gather, a
    wrong average: ≥ 1e-2) fails."""
    common = [
        f"data.path={pairs64}",
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=1",
        "checkpoint_every=100",
        "module.warmup_steps=2",
        *SAME_DATA,
    ]
    single_uri = f"sqlite:///{tmp_path}/single.db"
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", single_uri)
        train(stage_config("train", *common, "data.batch_size=16", f"output={tmp_path}/single"))
    reference = _losses(single_uri)
    assert len(reference) == 8
    for strategy in ("ddp", "fsdp"):
        uri = f"sqlite:///{tmp_path}/{strategy}.db"
        result = subprocess.run(
            _command(
                *common,
                f"trainer={strategy}",
                "data.batch_size=8",
                f"output={tmp_path}/{strategy}",
                f"hydra.run.dir={tmp_path}/h_{strategy}",
            ),
            env=subprocess_env(uri),
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es)" in result.stdout
        losses = _losses(uri)
        assert len(losses) == 8
        assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4, (strategy, losses, reference)
        assert os.path.exists(f"{tmp_path}/{strategy}/clip/model.safetensors")
    assert reference[-1] < reference[0]  # and it learns


def test_kill_9_then_the_same_command_resumes_to_the_same_final_step(tmp_path):
    shards = write_world_shards(tmp_path / "shards", 160, 20, image_size=32, corrupt=(3,))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = _command(
        f"data.path={shards}",
        f"output={tmp_path}/run",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.val_shards=1",
        "trainer.max_steps=120",
        "checkpoint_every=10",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}/hydra",
    )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    killed_at = kill_then_resume(command, last, kill_at=30, final_step=120, env=subprocess_env(uri))
    assert checkpoint_step(last) == 120
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])  # one run, continued
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) == 119 and min(steps) < killed_at
    corrupt = client.get_metric_history(run.info.run_id, "data/corrupt_skipped")
    assert max(m.value for m in corrupt) >= 1  # the truncated JPEG was met, skipped and counted
    assert run.data.params["data.batch_size"] == "8" and "val/loss" in run.data.metrics
    assert float(run.data.metrics["train/device/samples_per_sec"]) > 0


def test_bad_input_is_one_line_and_exit_2(tmp_path, pairs64):
    """The first bad input through the command as a user runs it (exit status 2, one `error:` line); the
    other through train() in this process, which must refuse it with the one-line UserError that command
    prints."""
    (args, needle), (other_args, other_needle) = (
        (["data.path=/nonexistent/shards"], "/nonexistent/shards"),
        ([f"data.path={pairs64}", "model=clip_pretrained", "model.path=/no/such/model"], "/no/such/model"),
    )
    result = subprocess.run(
        _command(*args, f"output={tmp_path}/bad", "tracking=false", f"hydra.run.dir={tmp_path}/h"),
        env=subprocess_env("sqlite:///unused.db"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert_refused_in_one_line(
        lambda: train(stage_config("train", *other_args, f"output={tmp_path}/bad", "tracking=false", *SAME_DATA)),
        other_needle,
    )
    # Fewer samples than one batch (a sweep's strictest threshold): refused, not trained for 0 steps and exported.
    small = [f"data.path={pairs64}", "data.batch_size=100", f"output={tmp_path}/small", "tracking=false", *SAME_DATA]
    assert_refused_in_one_line(
        lambda: train(stage_config("train", *small)), "64 training samples make no batch of data.batch_size=100"
    )
    assert not os.path.exists(f"{tmp_path}/small/clip/config.json")
    # Settings out of range: ours named by us (was a ZeroDivisionError), Lightning's by its own message.
    base = [f"data.path={pairs64}", f"output={tmp_path}/range", "tracking=false", *SAME_DATA]
    assert_refused_in_one_line(lambda: train(stage_config("train", *base, "data.batch_size=0")), "data.batch_size=0")
    assert_refused_in_one_line(
        lambda: train(stage_config("train", *base, "trainer.max_steps=-5")), "trainer: `max_steps` must be"
    )
    # The optimizer's own refusal, from inside Lightning's fit (was torch's ValueError traceback).
    assert_refused_in_one_line(
        lambda: train(stage_config("train", *base, "module.optimizer.lr=-1")),
        "module.optimizer (AdamW): Invalid learning rate: -1",
    )


def test_siglip_bf16_checkpointing_and_accumulation_run(pairs64, tmp_path):
    """The other recipe switches together: SigLIP (learnable bias), bf16 autocast, activation checkpointing,
    gradient accumulation; the bias and temperature start where SigLIP says and are logged."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = stage_config(
            "train",
            f"data.path={pairs64}",
            f"output={tmp_path}/run",
            "loss=siglip",
            "trainer.precision=bf16-mixed",
            "module.gradient_checkpointing=true",
            "trainer.accumulate_grad_batches=2",
            "data.batch_size=16",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            *SAME_DATA,
        )
        loss = train(cfg)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])
    assert run.data.metrics["train/logit_bias"] == pytest.approx(-10.0, abs=0.05)
    assert run.data.metrics["train/logit_scale"] == pytest.approx(10.0, abs=0.5)
    assert run.data.metrics["train/batches"] == 6  # 3 steps × 2 accumulated batches
    assert 0 < loss < 50


def test_fine_tuning_a_clip_folder_keeps_its_tokenizer_and_decays_only_matrices(pairs64, tiny_clip, tmp_path):
    from training.task_module import decay_groups

    start = load_clip(tiny_clip)
    net = ContrastiveClip(start.model)
    decay, rest = decay_groups(net, 0.2)
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(
        names[id(p)].endswith("weight")
        and p.ndim >= 2
        and "embedding." not in names[id(p)].replace("patch_embedding.", "")
        for p in decay["params"]
    )
    undecayed = {names[id(p)] for p in rest["params"]}
    assert {
        "clip.logit_scale",
        "clip.text_model.embeddings.token_embedding.weight",
        "clip.vision_model.embeddings.position_embedding.weight",
        "clip.text_model.final_layer_norm.weight",
    } <= undecayed
    cfg = stage_config(
        "train",
        f"data.path={pairs64}",
        f"output={tmp_path}/run",
        "model=clip_pretrained",
        f"model.path={tiny_clip}",
        "trainer.max_steps=2",
        "tracking=false",
        "data.batch_size=16",
        *SAME_DATA,
    )
    train(cfg)
    tuned = load_clip(f"{tmp_path}/run/clip")
    assert tuned.tokenizer.get_vocab() == start.tokenizer.get_vocab()
    before = load_clip(tiny_clip).model.text_projection.weight
    assert not torch.equal(tuned.model.text_projection.weight, before)  # it trained


def test_compiled_blocks_train_like_eager_ones(pairs64, tmp_path, monkeypatch):
    """`module.compile=true` compiles every transformer block (inductor on CPU, ~30 s here; a command of its
    own, so that no compiled state stays in the test process): the same three steps give the same losses as
    eager execution (train() in this process), up to kernel rounding."""
    losses = {}
    for compiled in ("false", "true"):
        uri = f"sqlite:///{tmp_path}/{compiled}.db"
        options = [
            f"data.path={pairs64}",
            f"output={tmp_path}/{compiled}",
            f"module.compile={compiled}",
            "data.batch_size=16",
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            *SAME_DATA,
        ]
        if compiled == "false":
            with monkeypatch.context() as env:
                env.setenv("MLFLOW_TRACKING_URI", uri)
                train(stage_config("train", *options))
        else:
            result = subprocess.run(
                _command(*options, f"hydra.run.dir={tmp_path}/h{compiled}"),
                env=subprocess_env(uri),
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            assert result.returncode == 0, result.stderr[-3000:]
        losses[compiled] = _losses(uri)
    assert len(losses["true"]) == 3
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) <= 1e-3, losses


def test_checkpoints_keep_the_last_k_besides_last(pairs64, tmp_path):
    """`checkpoint_keep=2`: the last two step checkpoints stay beside last.ckpt, older ones go."""
    cfg = stage_config(
        "train",
        f"data.path={pairs64}",
        f"output={tmp_path}/run",
        "data.batch_size=16",
        "trainer.max_steps=12",
        "checkpoint_every=3",
        "checkpoint_keep=2",
        "tracking=false",
        *SAME_DATA,
    )
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step00000009.ckpt", "step00000012.ckpt"]
    assert torch.load(tmp_path / "run" / "checkpoints" / "step00000009.ckpt", weights_only=False)["global_step"] == 9
