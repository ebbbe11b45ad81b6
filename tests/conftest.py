"""Shared fixtures: the real world server on 127.0.0.1, a real local Ray, the real Hydra configs. Helpers
that tests import are in support.py."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.world import World, WorldServer
from support import CONF, crawl_config, mlflow_server, read_rows, stage_config, world_config

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

    from training.clip.model import ClipBundle, image_processor_for, save_clip
    from training.tokenizer import train_tokenizer

    captions = [r["caption"] for r in read_rows(default_world_raw[0])]
    tokenizer = train_tokenizer(captions, vocab_size=400, max_length=32)
    model_cfg = OmegaConf.load(CONF / "model" / "clip_tiny.yaml")
    # Its own seed: a random CLIP maps every input near one direction, so the sign of its cosines (which the
    # CLIP-score filter and CLIPScore tests see) would otherwise depend on which tests ran before.
    torch.manual_seed(0)
    model = instantiate(model_cfg, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_clip(str(folder), ClipBundle(model, tokenizer, image_processor_for(int(model_cfg.image_size))))
    return str(folder)


@pytest.fixture(scope="session")
def annotated(tmp_path_factory, default_world_raw, tiny_clip):
    from pipeline.annotate.run import annotate

    out = tmp_path_factory.mktemp("meta")
    manifest = annotate(
        stage_config(
            "annotate", f"input={default_world_raw[0]}", f"output={out}", f"clip={tiny_clip}", "progress=false"
        )
    )
    return str(out), manifest


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the tests that only log to one, each to an experiment no other
    test on it uses (pixelmill: the filter's; pixelmill-zeroshot: evaluation's); yields its URI. Tests that stop
    their server in the middle have their own."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri
