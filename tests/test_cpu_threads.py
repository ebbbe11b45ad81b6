"""Local CPU ranks share the cores: a trainer of N CPU processes gives each torch cores // N threads (as torchrun
sets OMP_NUM_THREADS=1), a single process keeps them all, and an OMP_NUM_THREADS the user set wins."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch

from training.train import share_cpu_threads


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(before)


def _trainer(devices: int, strategy: str = "auto") -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False)


def test_two_cpu_ranks_each_take_half_the_cores(threads):
    cores = len(os.sched_getaffinity(0))
    share_cpu_threads(_trainer(2, "ddp"))
    assert torch.get_num_threads() == max(1, cores // 2)


def test_one_process_keeps_every_core_and_the_users_setting_wins(threads, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    share_cpu_threads(_trainer(1))
    assert torch.get_num_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    share_cpu_threads(_trainer(2, "ddp"))
    assert torch.get_num_threads() == cores
