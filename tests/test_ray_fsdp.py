"""FSDP2 on Ray Train: `launcher=ray launcher.num_workers=2 trainer=fsdp`, two CPU workers (gloo) on a local
Ray, follows the one-process loss, really shards every parameter between the workers, checkpoints as a
distributed-checkpoint folder and exports the same kind of transformers folder as a local run."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import torch
from transformers import CLIPModel

from pipeline.world.shards import write_world_shards
from support import ROOT, stage_config, subprocess_env
from training.train import train

# As tests/test_clip_train.py: one shard, no shuffling or cropping, so every run sees the same batches.
SAME_DATA = [
    "data.num_workers=0",
    "data.shuffle_buffer=0",
    "data.crop_scale=[1,1]",
    "trainer.enable_progress_bar=false",
]
STEPS = 8


@pytest.fixture(scope="module")
def pairs64(tmp_path_factory):
    return write_world_shards(tmp_path_factory.mktemp("pairs64"), 64, 64, image_size=32)


def _losses(tracking_uri: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def _shards_per_parameter(checkpoint) -> dict[str, int]:
    """How many ranks' pieces each parameter of a distributed checkpoint was saved from (its chunks): a plain
    tensor is written once, a DTensor sharded over 2 ranks as 2 slices of dim 0."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {
        key.removeprefix("state_dict."): len(entry.chunks)
        for key, entry in metadata.items()
        if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata) and entry.size[0] >= 2
    }


@pytest.mark.slow
def test_fsdp_on_two_ray_workers_follows_the_single_process_loss(pairs64, tmp_path, monkeypatch):
    """Global batch 16 for 8 steps: one process × 16 here, then 2 Ray Train workers × 8 under FSDP2 as a user
    runs it (`python -m training.train … launcher=ray`, its own local Ray). The same global batches, so the
    same loss up to float summation order: the 1e-4 of the local DDP/FSDP test."""
    common = [
        f"data.path={pairs64}",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "checkpoint_every=4",
        "module.warmup_steps=2",
        *SAME_DATA,
    ]
    single_uri = f"sqlite:///{tmp_path}/single.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", single_uri)
    train(stage_config("train", *common, "data.batch_size=16", f"output={tmp_path}/single"))
    reference = _losses(single_uri)

    uri = f"sqlite:///{tmp_path}/ray.db"
    run = tmp_path / "ray"
    command = [
        *(sys.executable, "-m", "training.train", *common),
        *("launcher=ray", "launcher.num_workers=2", "trainer=fsdp", "data.batch_size=8"),
        *(f"output={run}", f"hydra.run.dir={tmp_path}/hydra"),
    ]
    # RAY_ADDRESS=local: a Ray of its own (its workers inherit this environment, MLflow URI included), never
    # a cluster someone started on this machine.
    env = {**subprocess_env(uri), "RAY_ADDRESS": "local"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Ray Train: 2 worker(s) finished (fsdp)" in result.stdout and "2 process(es)" in result.stdout

    losses = _losses(uri)
    assert len(losses) == len(reference) == STEPS
    difference = max(abs(a - b) for a, b in zip(losses, reference))
    print(f"ray fsdp vs one process: max |Δloss| {difference:.2e} over {STEPS} steps")
    assert difference <= 1e-4, (losses, reference)

    # Each worker held and saved its own half of every parameter (embeddings, blocks, projections): FSDP2's
    # DTensors over a mesh of 2, in the same distributed-checkpoint folder a local trainer=fsdp writes.
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(last))
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == STEPS
    shards = _shards_per_parameter(last)
    assert any(".layers.0." in key for key in shards) and set(shards.values()) == {2}, shards

    # The export: the weights gathered into one transformers folder, as the one-process run's.
    exported = CLIPModel.from_pretrained(run / "clip").state_dict()
    single = CLIPModel.from_pretrained(tmp_path / "single" / "clip").state_dict()
    assert exported.keys() == single.keys()
    assert all(exported[k].shape == single[k].shape for k in single)


def test_workers_get_rays_strategy_for_ddp_and_for_fsdp(tmp_path):
    """What each worker trains with: RayDDPStrategy for the DDP bases; for trainer=fsdp, FSDP2 over a mesh of
    all `num_workers` (locally the mesh is `trainer.devices`), the user's other strategy options kept."""
    from omegaconf import OmegaConf

    from training.launchers import worker_config

    base = ["launcher=ray", f"data.path={tmp_path}", f"output={tmp_path / 'run'}", "launcher.num_workers=3"]
    for trainer in ("cpu", "ddp"):
        worker = worker_config(OmegaConf.to_container(stage_config("train", *base, f"trainer={trainer}"), resolve=True))
        assert worker.trainer.strategy == {"_target_": "ray.train.lightning.RayDDPStrategy"}
        assert worker.trainer.devices == "auto"
    cfg = stage_config("train", *base, "trainer=fsdp", "+trainer.strategy.save_distributed_checkpoint=false")
    strategy = worker_config(OmegaConf.to_container(cfg, resolve=True)).trainer.strategy
    assert strategy == {
        "_target_": "training.launchers.RayModelParallelStrategy",
        "data_parallel_size": 3,
        "tensor_parallel_size": 1,
        "save_distributed_checkpoint": False,
    }
