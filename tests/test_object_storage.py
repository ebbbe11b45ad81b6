"""Every data location in object storage: a real S3-compatible server (moto's, on 127.0.0.1) holds the URL list,
the raw crawl, the metadata, the selection, the training shards and the eval set; the commands run as a user
runs them (credentials and endpoint from the environment, for the pipeline's Ray workers too), and every row
ends as the ground truth says."""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from evaluation.run import evaluate
from pipeline.eval_set.export import export_eval_set
from support import PIPELINE_RUN, ROOT, eval_config, stage_config, subprocess_env
from training.train import train

BUCKET = "pixelmill-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port; yields (environment for commands, an s3fs filesystem)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # botocore's own setting
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # fsspec's, for s3fs versions that ignore the first
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir(BUCKET)
    try:
        yield env, fs
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def run(command: list[str], env: dict, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env={**subprocess_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_crawl_to_evaluation_with_every_data_location_on_s3(s3, world_lists, tiny_clip, tmp_path):
    env, fs = s3
    urls, truth_path = world_lists
    fs.put(urls, f"{BUCKET}/lists/urls.parquet")
    # The pipeline as a user runs it, with its own local Ray: its workers read and write S3 too.
    data = f"s3://{BUCKET}/run"
    options = [*PIPELINE_RUN, "shard.samples_per_shard=32", f"hydra.run.dir={tmp_path}/hydra"]
    run(
        ["pipeline.run", f"input=s3://{BUCKET}/lists/urls.parquet", f"output={data}", f"clip={tiny_clip}", *options],
        env,
    )
    crawled = json.loads(fs.cat(f"{BUCKET}/run/raw/manifest.json"))["counts"]
    expected = collections.Counter(t["expected_status"] for t in pq.read_table(truth_path).to_pylist())
    assert {status: crawled[status] for status in expected} == dict(expected)  # every row as on a local disk
    leftovers = [p for p in fs.find(f"{BUCKET}/run") if p.endswith("_lock.json") or ".tmp-" in p]
    assert leftovers == []  # locks given back, temporaries renamed or removed
    [shards] = fs.ls(f"{BUCKET}/run/shards")
    samples = json.loads(fs.cat(f"{shards}/manifest.json"))["counts"]["samples"]
    assert samples > 50

    evalset = f"s3://{BUCKET}/evalsets/colour"
    export_eval_set(stage_config("eval_set", f"output={evalset}", "n=40", "samples_per_shard=20"))
    model = tmp_path / "run"  # models stay on a filesystem: save_pretrained writes folders
    cfg = stage_config(
        "train",
        f"data.path=s3://{shards}",
        f"output={model}",
        "trainer.max_steps=4",
        "data.batch_size=8",
        "data.num_workers=1",
        "trainer.enable_progress_bar=false",
        "tracking=false",
    )
    train(cfg)
    assert (model / "clip" / "config.json").exists()
    out = tmp_path / "eval.json"
    evaluate(
        eval_config(
            "benchmark=zeroshot",
            f"clip={model / 'clip'}",
            f"dataset={evalset}",
            f"output={out}",
            "tracking=false",
            "num_workers=1",
            "progress=false",
        )
    )
    results = json.load(open(out))
    assert (results["dataset"], results["samples"], results["classes"]) == ("colour", 40, 6)
    assert 0 <= results["metrics"]["acc1"] <= 1
