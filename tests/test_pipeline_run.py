"""`python -m pipeline.run -m` over three CLIP-score thresholds: three shard sets, nested MLflow runs, one
crawl and one annotation. And tracking against a real `mlflow server` on loopback."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from pipeline.filter.run import filter_samples
from support import PIPELINE_RUN, stage_config


@pytest.mark.slow
def test_multirun_sweep_annotates_once_nests_runs_and_trains_a_model_per_value(world_lists, tiny_clip, tmp_path):
    """A threshold sweep (`-m filter.clip_score.top_fraction=…`) crawls and annotates once, filters and shards
    per value, nests its jobs' runs under one parent; with `+sweep_model=clip_zeroshot` each job also trains a
    CLIP on its shards and evaluates it zero-shot, and the parent charts samples and accuracy against the value.
    A value that leaves less than a batch gets no model (a warning), and the sweep goes on."""
    import mlflow

    from pipeline.eval_set.export import export_eval_set

    urls, _ = world_lists
    out = tmp_path / "out"
    export_eval_set(stage_config("eval_set", "attribute=colour", f"output={tmp_path / 'colour'}", "n=30"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    command = [
        sys.executable,
        "-m",
        "pipeline.run",
        "-m",
        f"input={urls}",
        f"output={out}",
        f"clip={tiny_clip}",
        "filter=clip_score",
        "filter.clip_score.min=null",
        "filter.clip_score.top_fraction=0.1,0.3,0.6,0.9",  # 0.1 keeps less than a batch of 16, the rest more
        "+sweep_model=clip_zeroshot",
        f"+sweep_model.datasets.colour={tmp_path / 'colour'}",
        'sweep_model.overrides=["data.batch_size=16","trainer.max_steps=6","data.num_workers=0"]',
        *PIPELINE_RUN,
        "shard.samples_per_shard=16",
        "crawl.ray.num_cpus=2",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("trained clip: step 6,") == 3  # each model trained its steps (not 0, then exported)
    assert log.count("warning: no model for") == 1 and "make no batch of data.batch_size=16" in log
    assert log.count("annotate summary") == 1 and log.count("annotate: ") == 3  # once, then "nothing to do" thrice
    assert log.count("crawl summary") == 1
    assert "Failed to kill actor" not in log  # Ray's GCS on ended actor pools: pixelmill.log, not the console
    shard_sets = sorted(glob.glob(f"{out}/shards/*"))
    assert len(shard_sets) == 4
    samples = sorted(json.load(open(f"{s}/manifest.json"))["counts"]["samples"] for s in shard_sets)
    assert samples[0] < 16 <= samples[1] < samples[2] < samples[3]  # a larger fraction keeps more
    for folder in shard_sets:
        assert (
            sum(json.load(open(f"{folder}/sizes.json")).values())
            == json.load(open(f"{folder}/manifest.json"))["counts"]["samples"]
        )
    assert len(glob.glob(f"{out}/models/*/clip/config.json")) == 3  # a model per value that holds a batch
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["pixelmill"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 4
    assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    assert sorted(children["metrics.shard.samples"]) == samples
    assert set(children["params.filter.clip_score.top_fraction"]) == {"0.1", "0.3", "0.6", "0.9"}
    accuracy = children["metrics.zeroshot.colour.acc1"]
    assert accuracy.notna().sum() == 3 and accuracy.dropna().between(0, 1).all()
    parent = parents["run_id"].iloc[0]  # the sweep chart: samples kept and accuracy against the threshold
    assert {"sweep.png", "sweep.json"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(parent)}
    chart = mlflow.artifacts.load_dict(f"{mlflow.get_run(parent).info.artifact_uri}/sweep.json")
    assert chart["filter.clip_score.top_fraction"] == ["0.1", "0.3", "0.6", "0.9"]
    assert chart["shard.samples"] == samples
    assert chart["zeroshot.colour.acc1"][0] is None  # the value without a model: a gap in the chart
    assert sorted(chart["zeroshot.colour.acc1"][1:]) == sorted(accuracy.dropna())


@pytest.mark.slow
def test_filter_logs_to_a_real_mlflow_server(annotated, shared_mlflow_server, tmp_path, monkeypatch):
    import mlflow

    uri = shared_mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    meta_dir, _ = annotated
    manifest = filter_samples(stage_config("filtering", f"input={meta_dir}", f"output={tmp_path / 'sel'}"))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pixelmill"])
    assert len(runs) == 1 and runs["metrics.filter.kept"].iloc[0] == manifest["counts"]["kept"]
    assert runs["tags.data.meta_hash"].iloc[0] == manifest["input_content_hash"]
    png = mlflow.artifacts.download_artifacts(
        run_id=runs["run_id"].iloc[0], artifact_path="filter/funnel.png", dst_path=str(tmp_path / "dl")
    )
    assert open(png, "rb").read(4) == b"\x89PNG"
