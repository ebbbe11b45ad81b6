"""What tests share besides fixtures: paths, the real configs composed with test overrides, commands run
and killed as a user would, a real MLflow server, and stand-in prompt files. Test modules import it as
`support` (pytest puts tests/ on the path); the world's training shards are `pipeline.world.shards`."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
DRAWBENCH_CSV = SHARED / "data" / "drawbench.csv"  # the 200 official prompts: beside the clone in CI, not in it
# Prompts per category in the paper's DrawBench (Saharia et al., 2022, appendix).
DRAWBENCH_COUNTS = {
    "Colors": 25,
    "Conflicting": 10,
    "Counting": 19,
    "DALL-E": 20,
    "Descriptions": 20,
    "Gary Marcus et al.": 10,
    "Misspellings": 10,
    "Positional": 20,
    "Rare Words": 7,
    "Reddit": 38,
    "Text": 21,
}
needs_official_drawbench = pytest.mark.skipif(
    not DRAWBENCH_CSV.exists(), reason=f"the official DrawBench prompts ({DRAWBENCH_CSV}) are not beside this clone"
)


def drawbench_like_csv(path: Path) -> Path:
    """A stand-in with DrawBench's shape (`prompt,category`, 200 prompts in its 11 categories, a quoted
    comma) for tests that need that shape but not the official text."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "category"])
        for category, count in DRAWBENCH_COUNTS.items():
            for i in range(count):
                writer.writerow([f"{category.lower()} picture {i}, with a comma", category])
    return path


class RandomnessProbe(pl.Callback):
    """A Lightning callback (attached by `+callbacks.probe._target_=support.RandomnessProbe`, with tests/ on
    PYTHONPATH) that writes, per rank, a checksum of the weights at the start of training and what the
    training step's first draws from torch's generator (timesteps, noise) would be, without drawing them."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx != 0:
            return
        with torch.random.fork_rng():
            draws = {"timesteps": torch.randint(0, 1000, (8,)).tolist(), "noise": torch.randn(4).tolist()}
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.parameters()]  # FSDP shards
        weights = float(sum(p.detach().double().sum() for p in full))
        os.makedirs(self.folder, exist_ok=True)
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"weights": weights, **draws}, f)


class StepDelay(pl.Callback):
    """Each training step takes at least `seconds` (`+callbacks.delay._target_=support.StepDelay`, tests/ on
    PYTHONPATH): a run long enough for a test to act in the middle of it, however fast the machine."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class HoldAtStep(pl.Callback):
    """Training waits after step `step` until the file `until` exists, `timeout_s` at most
    (`+callbacks.hold._target_=support.HoldAtStep`, tests/ on PYTHONPATH): a run still going when the test has
    done what it does in the middle of it, without a run made long for it."""

    def __init__(self, step: int, until: str, timeout_s: float = 180):
        self.step, self.until, self.timeout_s, self.held = int(step), str(until), float(timeout_s), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.held or trainer.global_step < self.step:
            return
        self.held = True
        deadline = time.time() + self.timeout_s
        while not os.path.exists(self.until) and time.time() < deadline:
            time.sleep(0.1)


# pipeline.run as a test runs it on the world: loopback allowed, small images, quick retries, no bars.
PIPELINE_RUN = [
    "crawl.allow_networks=[127.0.0.1/32]",
    "crawl.image_size=64",
    "crawl.timeout=1",
    "crawl.retries=1",
    "crawl.retry_backoff=0.05",
    "crawl.progress=false",
    "annotate.progress=false",
    "shard.progress=false",
]


def world_config(**overrides):
    cfg = OmegaConf.load(CONF / "world" / "default.yaml")
    cfg.n = 120
    cfg.slow_seconds = 2.5
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def crawl_config(*overrides: str):
    """The real conf/crawl.yaml, with the settings every test crawl of the world needs."""
    base = [
        "allow_networks=[127.0.0.1/32]",
        "timeout=1",
        "retries=1",
        "retry_backoff=0.05",
        "number_sample_per_shard=40",
        "image_size=64",
        "max_bytes=1048576",
        "progress=false",
    ]
    return stage_config("crawl", *base, *overrides)


def read_rows(folder) -> list[dict]:
    """Every row of a crawl's per-shard parquet files, in key order."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{folder}/0*.parquet"))]).to_pylist()


def stage_config(name: str, *overrides: str, folder: Path = CONF):
    """A stage's real config from conf/ (or a folder of it), with overrides."""
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def eval_config(*overrides: str):
    """conf/evaluate.yaml, as `python -m evaluation.run` composes it."""
    return stage_config("evaluate", *overrides)


def subprocess_env(tracking_uri: str = "sqlite:///unused.db") -> dict:
    """The environment for a command run as a user would: offline, MLflow where the test says."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}


def kill_session(process: subprocess.Popen) -> None:
    """kill -9 the command and everything it started (its local Ray, its loader workers, DDP ranks)."""
    os.killpg(process.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    process.wait(timeout=30)


def kill_when(
    command: list[str], ready, deadline_s: float = 120, poll_s: float = 0.02, env: dict | None = None
) -> None:
    """Run `command` in its own session and kill -9 it as soon as `ready()` holds; fails if it ends first."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + deadline_s
    while not ready():
        assert process.poll() is None and time.time() < deadline, "the command ended before it could be killed"
        time.sleep(poll_s)
    kill_session(process)


def kill_then_resume(command: list[str], checkpoint: Path, kill_at: int, final_step: int, env: dict) -> int:
    """Training killed with -9 once `checkpoint` holds step `kill_at` or later, then the same command run
    again: it must finish at `final_step` from the checkpoint. Returns the step it was killed at."""
    kill_when(command, lambda: checkpoint_step(checkpoint) >= kill_at, deadline_s=90, poll_s=0.5, env=env)
    killed_at = checkpoint_step(checkpoint)
    assert kill_at <= killed_at < final_step
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {final_step} (resumed)" in result.stdout
    return killed_at


def run_in_process(stage, command: list[str]) -> dict:
    """What `command` (`python -m pipeline.<name> <overrides>`) runs, run by `stage` (its stage function) in this
    process on this process's Ray; returns the manifest. A resume after a kill -9 meets what the dead command
    left (its lock, half-written files, done records) as the same command run again would, without the 15-20 s
    a command spends starting Python and a Ray of its own."""
    return stage(stage_config(command[2].rsplit(".", 1)[-1], *command[3:]))


def checkpoint_step(path: Path) -> int:
    """The global step of a Lightning checkpoint, -1 while there is none."""
    import torch

    return torch.load(path, weights_only=False)["global_step"] if path.exists() else -1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_refused_in_one_line(call, needle: str) -> None:
    """`call()` (a stage function in this process) refuses with the one-line UserError that its command prints as
    `error: <refusal>` before exiting 2 (training.errors.run_command finds it the same way), naming `needle`."""
    from training.errors import user_error

    with pytest.raises(Exception) as raised:
        call()
    refusal = user_error(raised.value)
    assert refusal is not None, raised.value
    assert needle in str(refusal) and "\n" not in str(refusal), str(refusal)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` (sqlite store and artifacts under `folder`), once it
    answers. Started again on the same folder and port, it is the same server after a restart."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/server.db",
            "--workers",
            "1",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while True:  # until it answers HTTP (its port listens before its worker does, on a busy machine seconds before)
        try:
            with _NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            stop_mlflow_server(server)
            raise AssertionError("mlflow server did not start")
        time.sleep(0.25)


def stop_mlflow_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, 9)
    server.wait(timeout=30)


@contextmanager
def mlflow_server(folder: Path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store and artifacts under `folder`); yields its URI."""
    port = free_port()
    server = start_mlflow_server(folder, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(server)


def shard_stream(path, tokenizer, **overrides):
    """A training ShardStream over the shards at `path` as one process and one loader worker read them, batches
    of 4 at 16 px and 16 tokens, epoch 0, seed 0; `overrides` changes any of it."""
    from training.data.datamodule import ShardStream
    from training.data.shards import list_shards
    from training.data.transforms import TrainTransform

    settings = dict(
        tokenizer=tokenizer,
        transform=TrainTransform(16),
        batch_size=4,
        context_length=16,
        epoch=0,
        seed=0,
        rank=0,
        world=1,
        workers=1,
        resampled=False,
        epoch_samples=None,
    )
    return ShardStream(list_shards(path), **{**settings, **overrides})
