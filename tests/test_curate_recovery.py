"""Annotate and shard killed with -9 mid-run resume with the same command and finish with the same result."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import pytest

from pipeline.annotate.run import annotate
from pipeline.filter.run import filter_samples
from pipeline.shard.run import shard
from support import kill_when, run_in_process, stage_config

SHARDS = 12


@pytest.fixture(scope="module")
def many_shards(default_world_raw, tmp_path_factory):
    """The world's raw tars copied into SHARDS shards, so that a kill lands between shards."""
    raw, _ = default_world_raw
    folder = tmp_path_factory.mktemp("many")
    tars = sorted(glob.glob(f"{raw}/*.tar"))
    for i in range(SHARDS):
        shutil.copy(tars[i % len(tars)], folder / f"{i:05d}.tar")
    return folder


@pytest.mark.slow
def test_annotate_killed_resumes_to_the_same_result(many_shards, tiny_clip, tmp_path):
    def command(out):
        return [
            sys.executable,
            "-m",
            "pipeline.annotate",
            f"input={many_shards}",
            f"output={out}",
            f"clip={tiny_clip}",
            "clip_batch_size=8",
            "ray.num_cpus=2",
        ]

    killed = tmp_path / "killed"
    kill_when(command(killed), lambda: len(glob.glob(f"{killed}/_work/done/*.json")) >= 2)
    before = len(glob.glob(f"{killed}/_work/done/*.json"))
    assert before < SHARDS and not os.path.exists(killed / "manifest.json")
    run_in_process(annotate, command(killed))  # the resume
    resumed = json.load(open(killed / "manifest.json"))
    assert resumed["last_run"]["shards_annotated"] <= SHARDS - before
    clean = annotate(stage_config("annotate", *command(tmp_path / "clean")[3:], "progress=false"))
    assert resumed["content_hash"] == clean["content_hash"] and resumed["counts"] == clean["counts"]
    assert not glob.glob(f"{killed}/*.tmp-*")


@pytest.mark.slow
def test_shard_killed_resumes_to_the_same_result(default_world_raw, annotated, tmp_path):
    raw, _ = default_world_raw
    meta_dir, _ = annotated
    sel = tmp_path / "sel"
    filter_samples(stage_config("filtering", f"input={meta_dir}", f"output={sel}", "tracking=false"))

    def command(out):
        return [
            sys.executable,
            "-m",
            "pipeline.shard",
            f"input={raw}",
            f"selection={sel}",
            f"output={out}",
            "samples_per_shard=4",
            "processes=1",
            "ray.num_cpus=2",
        ]

    killed = tmp_path / "killed"
    kill_when(command(killed), lambda: len(glob.glob(f"{killed}/_work/done/*.json")) >= 2)
    done_before = len(glob.glob(f"{killed}/_work/done/*.json"))
    assert not os.path.exists(killed / "manifest.json")
    run_in_process(shard, command(killed))  # the resume
    resumed = json.load(open(killed / "manifest.json"))
    clean = shard(stage_config("shard", *command(tmp_path / "clean")[3:], "progress=false"))
    assert resumed["content_hash"] == clean["content_hash"] and resumed["counts"]["shards"] > done_before
    assert json.load(open(killed / "sizes.json")) == json.load(open(tmp_path / "clean" / "sizes.json"))
