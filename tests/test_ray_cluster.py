"""A real Ray cluster on 127.0.0.1 with token authentication on: a pipeline job and a 2-worker Ray Train job
go through the Jobs API (what `ray job submit` uses), finish SUCCEEDED, and leave their outputs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from support import PIPELINE_RUN, kill_session, subprocess_env

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` with token authentication, its own temp dir (so no other test's `ray.init()` finds
    it) and its own process session (so stopping it stops nothing else)."""
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    folder = tmp_path_factory.mktemp("cluster")
    env = {**subprocess_env(f"sqlite:///{folder}/mlflow.db"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    dashboard = free_port()
    # Every port its own: the session's local Ray (other tests) holds Ray's default agent ports.
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            *ports,
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=folder,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while jobs_api_status(address, token) != 200:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not start"
            time.sleep(1)
        yield {"address": address, "token": token, "env": env, "folder": folder}
    finally:
        kill_session(head)
        shutil.rmtree(temp, ignore_errors=True)


def jobs_api_status(address: str, token: str | None) -> int:
    """HTTP status of the Jobs API's job list for a request carrying `token` (none: no header); 0 while the
    dashboard does not listen yet."""
    request = urllib.request.Request(
        f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def run_job(ray_head, entrypoint: list[str], timeout_s: float = 300) -> str:
    """`ray job submit` as a user runs it (the Jobs API client, with RAY_AUTH_MODE=token and the head's
    token), in its own process: this test process already holds the token of its own local Ray. Checks
    that `ray job status` says it succeeded; returns the job's logs."""
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"]}
    deadline = time.time() + 60
    while True:  # a fresh head answers before its job agent is up, and says to try again
        job = f"job-{secrets.token_hex(4)}"
        submitted = subprocess.run(
            [RAY, "job", "submit", "--submission-id", job, "--", *entrypoint],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        logs = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in logs or time.time() > deadline:
            break
        time.sleep(2)
    status = subprocess.run([RAY, "job", "status", job], env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0 and f"Job '{job}' succeeded" in status.stdout + status.stderr, logs[-4000:]
    return logs


def test_the_jobs_api_refuses_requests_without_the_token(ray_head):
    """Authentication is on: no token → 401, a wrong one → 403, the head's → 200."""
    statuses = [jobs_api_status(ray_head["address"], token) for token in (None, "not-the-token", ray_head["token"])]
    assert statuses == [401, 403, 200]


@pytest.fixture(scope="module")
def cluster_jobs(ray_head, world_lists):
    """A pipeline job (crawl → annotate → filter → shard), then a CLIP training job on 2 Ray Train workers
    (FSDP2)."""
    urls, _ = world_lists
    out, hydra, run = ray_head["folder"] / "data", ray_head["folder"] / "hydra", ray_head["folder"] / "clip"
    pipeline_logs = run_job(
        ray_head,
        [
            sys.executable,
            "-m",
            "pipeline.run",
            f"input={urls}",
            f"output={out}",
            *PIPELINE_RUN,
            "shard.samples_per_shard=32",
            f"hydra.run.dir={hydra}/p",
        ],
    )
    (shards,) = list((out / "shards").iterdir())
    training_logs = run_job(
        ray_head,
        [
            sys.executable,
            "-m",
            "training.train",
            "task=clip",
            f"data.path={shards}",
            f"output={run}",
            "launcher=ray",
            "launcher.num_workers=2",
            "trainer=fsdp",  # FSDP2 on the Ray Train workers: each holds half of every parameter
            "trainer.max_steps=12",
            "data.batch_size=8",
            "data.num_workers=0",
            "checkpoint_every=6",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={hydra}/t",
        ],
    )
    return {"shards": shards, "run": run, "raw": out / "raw", "logs": (pipeline_logs, training_logs)}


def test_pipeline_job_then_two_worker_training_job(cluster_jobs):
    from transformers import CLIPModel

    pipeline_logs, training_logs = cluster_jobs["logs"]
    assert "crawl summary" in pipeline_logs
    assert json.load(open(cluster_jobs["shards"] / "manifest.json"))["counts"]["samples"] > 50
    assert "Ray Train: 2 worker(s) finished" in training_logs and "2 process(es)" in training_logs
    run = cluster_jobs["run"]
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").exists()  # FSDP2's distributed-checkpoint folder
    CLIPModel.from_pretrained(run / "clip")  # the export loads where users load it


def test_lineage_from_an_evaluation_back_to_the_crawl(ray_head, cluster_jobs, tmp_path, monkeypatch):
    """Evaluation run → model run (tag) → the shards, filter and crawl manifests it was made from (tags and
    artifacts), each equal to the file on disk."""
    import mlflow

    from evaluation.run import evaluate
    from pipeline.eval_set.export import export_eval_set
    from support import eval_config, stage_config

    uri = ray_head["env"]["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    export_eval_set(stage_config("eval_set", "attribute=colour", f"output={tmp_path / 'colour'}", "n=30"))
    evaluate(
        eval_config(
            f"clip={cluster_jobs['run'] / 'clip'}",
            f"dataset={tmp_path / 'colour'}",
            f"output={tmp_path / 'result.json'}",
            "progress=false",
        )
    )
    client = mlflow.MlflowClient(uri)
    (evaluation,) = client.search_runs([client.get_experiment_by_name("pixelmill-zeroshot").experiment_id])
    model_run = client.get_run(evaluation.data.tags["pixelmill.model_run_id"])
    assert model_run.data.tags["pixelmill.task"] == "clip"
    tags = model_run.data.tags
    assert tags["pixelmill.lineage.shard"] == str(cluster_jobs["shards"])
    assert tags["pixelmill.lineage.crawl"] == str(cluster_jobs["raw"])
    artifacts = {a.path for a in client.list_artifacts(model_run.info.run_id, "lineage")}
    assert artifacts == {f"lineage/{s}_manifest.json" for s in ("shard", "filter", "annotate", "crawl")}
    for stage in ("shard", "filter", "annotate", "crawl"):
        logged = mlflow.artifacts.load_dict(f"{model_run.info.artifact_uri}/lineage/{stage}_manifest.json")
        assert logged == json.load(open(f"{tags[f'pixelmill.lineage.{stage}']}/manifest.json"))
    shard_manifest = mlflow.artifacts.load_dict(f"{model_run.info.artifact_uri}/lineage/shard_manifest.json")
    filter_manifest = mlflow.artifacts.load_dict(f"{model_run.info.artifact_uri}/lineage/filter_manifest.json")
    assert shard_manifest["config"]["selection"] == tags["pixelmill.lineage.filter"]
    assert "exact_duplicate" in filter_manifest["config"]["filter"]  # the rules that chose the data
    assert tags["pixelmill.data_hash"] == shard_manifest["content_hash"]


def test_ray_launcher_refuses_what_it_cannot_run(tmp_path):
    from hydra.utils import instantiate

    from support import stage_config
    from training.errors import UserError

    base = ["launcher=ray", f"data.path={tmp_path}", f"output={tmp_path / 'run'}"]
    # FSDP2 (trainer=fsdp) runs under Ray (tests/test_ray_fsdp.py); Lightning's FSDP1 and tensor parallelism do not.
    with pytest.raises(UserError, match="launcher=ray runs DDP .* or FSDP2 .* workers; trainer.strategy=fsdp is not"):
        cfg = stage_config("train", *base, "trainer=cpu", "+trainer.strategy=fsdp")
        instantiate(cfg.launcher)(cfg)
    with pytest.raises(UserError, match="tensor_parallel_size=2 is not supported"):
        cfg = stage_config("train", *base, "trainer=fsdp", "trainer.strategy.tensor_parallel_size=2")
        instantiate(cfg.launcher)(cfg)
    with pytest.raises(UserError, match="launcher.num_workers=0; expected at least 1"):
        cfg = stage_config("train", *base, "launcher.num_workers=0")
        instantiate(cfg.launcher)(cfg)
