"""Shared fixtures: the real world server on 127.0.0.1, a real local Ray, the real Hydra configs."""

from __future__ import annotations

import glob
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.world import World, WorldServer

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations phones home on import


def _loopback_only(event: str, args) -> None:
    """Tests talk to 127.0.0.1 only: a TCP connect anywhere else fails before a packet leaves."""
    if event != "socket.connect":
        return
    sock, address = args
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return  # a UDP connect() sends nothing; Unix sockets stay on the machine
    host = address[0]
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise PermissionError(f"test tried to connect to {address}: only loopback is allowed")


sys.addaudithook(_loopback_only)


def world_config(**overrides):
    cfg = OmegaConf.load(CONF / "world" / "default.yaml")
    cfg.n = 120
    cfg.slow_seconds = 2.5
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def crawl_config(*overrides: str):
    """The real conf/crawl.yaml, with the settings every test crawl of the world needs."""
    base = ["allow_networks=[127.0.0.1/32]", "timeout=1", "retries=1", "retry_backoff=0.05",
            "number_sample_per_shard=40", "image_size=64", "max_bytes=1048576", "progress=false"]
    return stage_config("crawl", *base, *overrides)


def read_rows(folder) -> list[dict]:
    """Every row of a crawl's per-shard parquet files, in key order."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{folder}/0*.parquet"))]).to_pylist()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world():
    return World(world_config())


@pytest.fixture(scope="session")
def world_server(world):
    with WorldServer(world) as server:
        yield server


@pytest.fixture(scope="session")
def world_lists(world, world_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    urls, truth = world.write(folder, world_server.base_url)
    return urls, truth


def stage_config(name: str, *overrides: str, folder: Path = CONF):
    """A stage's real config from conf/ (or a folder of it), with overrides."""
    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def eval_config(*overrides: str):
    """conf/evaluation/eval.yaml, as `python -m evaluation.run` composes it."""
    return stage_config("eval", *overrides, folder=CONF / "evaluation")


@pytest.fixture(scope="session")
def default_world_raw(tmp_path_factory, ray_local):
    """The default world (240 rows) served and crawled once: (raw folder, ground truth path)."""
    from pipeline.crawl.run import crawl

    world = World(world_config(n=240))
    folder = tmp_path_factory.mktemp("default_world")
    with WorldServer(world) as server:
        urls, truth = world.write(folder / "world", server.base_url)
        crawl(crawl_config(f"input={urls}", f"output={folder / 'raw'}"))
    return str(folder / "raw"), truth


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, default_world_raw):
    """A tiny CLIP (random weights) from conf/model/clip_tiny.yaml, its tokenizer trained on world captions."""
    from hydra.utils import instantiate

    from training.clip_model import ClipBundle, image_processor_for, save_clip
    from training.tokenizer import train_tokenizer

    captions = [r["caption"] for r in read_rows(default_world_raw[0])]
    tokenizer = train_tokenizer(captions, vocab_size=400, max_length=32)
    model_cfg = OmegaConf.load(CONF / "model" / "clip_tiny.yaml")
    model = instantiate(model_cfg, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_clip(str(folder), ClipBundle(model, tokenizer, image_processor_for(int(model_cfg.image_size))))
    return str(folder)


@pytest.fixture(scope="session")
def annotated(tmp_path_factory, default_world_raw, tiny_clip):
    from pipeline.annotate.run import annotate

    out = tmp_path_factory.mktemp("meta")
    manifest = annotate(stage_config("annotate", f"input={default_world_raw[0]}", f"output={out}", f"clip={tiny_clip}", "progress=false"))
    return str(out), manifest


def write_world_shards(folder, n: int, per_shard: int, image_size: int = 48, first_index: int = 0,
                       corrupt: tuple[int, ...] = (), **world) -> str:
    """Training shards straight from the world's scenes (no crawl): `{key}.jpg` + `{key}.txt`, keys numbered
    from `first_index`, and `sizes.json`. Samples whose number is in `corrupt` get truncated JPEG bytes."""
    import json

    from pipeline.storage import Location
    from pipeline.tar_io import TarSampleWriter
    from pipeline.world.render import encode_jpeg, render
    from pipeline.world.scene import Vocabulary, caption, sample_scene

    cfg = OmegaConf.load(CONF / "world" / "default.yaml")
    for key, value in world.items():
        OmegaConf.update(cfg, key, value, merge=False)  # replace: a smaller palette drops the other colours
    vocab = Vocabulary.from_config(cfg)
    location = Location(str(folder))
    location.makedirs()
    sizes = {}
    for start in range(0, n, per_shard):
        name = f"{start // per_shard:05d}.tar"
        writer = TarSampleWriter(location, name)
        for i in range(first_index + start, first_index + min(start + per_shard, n)):
            scene = sample_scene(vocab, 0, i, 0.0)
            image = encode_jpeg(render(scene, vocab, image_size), 90)
            if i in corrupt:
                image = image[: len(image) // 3]
            writer.add({"__key__": f"{i:09d}", "jpg": image, "txt": caption(scene, phrasing=i).encode()})
        writer.close()
        sizes[name] = writer.samples
    with open(f"{folder}/sizes.json", "w") as f:
        json.dump(sizes, f)
    return str(folder)


def subprocess_env(tracking_uri: str = "sqlite:///unused.db") -> dict:
    """The environment for a command run as a user would: offline, MLflow where the test says."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}


def kill_session(process: subprocess.Popen) -> None:
    """kill -9 the command and everything it started (its local Ray, its loader workers, DDP ranks)."""
    os.killpg(process.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)
    process.wait(timeout=30)


def kill_when(command: list[str], ready, deadline_s: float = 120, poll_s: float = 0.02, env: dict | None = None) -> None:
    """Run `command` in its own session and kill -9 it as soon as `ready()` holds; fails if it ends first."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
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


def checkpoint_step(path: Path) -> int:
    """The global step of a Lightning checkpoint, -1 while there is none."""
    import torch

    return torch.load(path, weights_only=False)["global_step"] if path.exists() else -1


@contextmanager
def mlflow_server(folder: Path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store and artifacts under `folder`); yields its URI."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder}/server.db", "--workers", "1",
                               "--artifacts-destination", str(folder / "artifacts")],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, 9)
        server.wait(timeout=30)
