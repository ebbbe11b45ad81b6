"""Killed crawls resume to the same result; `retry_failed=true` fetches again only transient failures."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.crawl.run import crawl
from pipeline.world import World, WorldServer
from support import ROOT, crawl_config, kill_when, read_rows, run_in_process, world_config


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes(ray_local, tmp_path, capsys):
    world = World(world_config(latency=0.05))
    with WorldServer(world) as server:
        urls, truth_path = world.write(tmp_path, server.base_url)
        out = tmp_path / "raw"
        command = crawl_command(urls, out, "number_sample_per_shard=10", "concurrency=4")
        kill_when(command, lambda: len(glob.glob(f"{out}/_work/done/*.json")) >= 2)
        done_before = sorted(glob.glob(f"{out}/_work/done/*.json"))
        assert 2 <= len(done_before) < 12 and not os.path.exists(out / "manifest.json")
        requests_before = dict(server.requests)

        capsys.readouterr()
        run_in_process(crawl, command)  # the resume
        assert f"{len(done_before)} of 12 shards already done" in capsys.readouterr().err  # its progress bar

    truth = pq.read_table(truth_path).to_pylist()
    rows = read_rows(out)
    assert [(r["key"], r["url"]) for r in rows] == [(f"{t['row'] // 10:05d}{t['row'] % 10}", t["url"]) for t in truth]
    assert [(r["status"], r["reason"]) for r in rows] == [(t["expected_status"], t["expected_reason"]) for t in truth]
    assert not glob.glob(f"{out}/*.tmp-*") and os.path.exists(out / "manifest.json")
    # Shards finished before the kill were not fetched again.
    finished = {int(os.path.basename(p)[:5]) for p in done_before}
    for t in truth:
        path = "/" + t["url"].split("/", 3)[3]
        if t["row"] // 10 in finished and t["fault"] == "none":
            assert server.requests[path] == requests_before[path] == 1


def test_retry_failed_fetches_only_transient_failures_again(ray_local, tmp_path):
    world = World(world_config(n=80, faults={"flaky": 0.05, "http_404": 0.05, "http_500": 0.03, "reset": 0.02}))
    with WorldServer(world) as server:
        urls, truth_path = world.write(tmp_path, server.base_url)
        out = tmp_path / "raw"
        options = [f"input={urls}", f"output={out}", "retries=0", "number_sample_per_shard=20"]
        first = crawl(crawl_config(*options))
        assert first["counts"]["reasons"]["failed_to_download"]["http_503"] == 4  # flaky, on its first request
        stats_before = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/*_stats.json")}
        requests_before = dict(server.requests)

        second = crawl(crawl_config(*options, "retry_failed=true"))
        truth = pq.read_table(truth_path).to_pylist()
        rows = read_rows(out)
        for t, r in zip(truth, rows):
            path = "/" + t["url"].split("/", 3)[3]
            if t["fault"] == "flaky":
                assert r["status"] == "success"  # the second request got the image
            elif t["fault"] in ("http_500", "reset"):
                assert r["status"] == "failed_to_download" and server.requests[path] > requests_before[path]
            else:  # permanent failures and successes were left alone
                assert server.requests[path] == requests_before[path]
                assert (r["status"], r["reason"]) == (t["expected_status"], t["expected_reason"])
        assert second["counts"]["success"] == first["counts"]["success"] + 4
        assert second["counts"]["bytes_downloaded"] > first["counts"]["bytes_downloaded"]  # old bytes kept, new added
        assert second["last_run"]["rows_retried"] == sum(t["fault"] in ("flaky", "http_500", "reset") for t in truth)
        # The tar of a rewritten shard holds its old samples and the new ones.
        keys = {k for (k,) in wds.WebDataset(sorted(glob.glob(f"{out}/*.tar")), shardshuffle=False).to_tuple("__key__")}
        assert keys == {r["key"] for r in rows if r["status"] == "success"}
        # Shards without a transient failure were not rewritten.
        untouched = [
            p
            for p in stats_before
            if not any(
                t["fault"] in ("flaky", "http_500", "reset") and t["row"] // 20 == int(os.path.basename(p)[:5])
                for t in truth
            )
        ]
        assert untouched and all(os.stat(p).st_mtime_ns == stats_before[p] for p in untouched)


def crawl_command(urls, out, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.crawl",
        f"input={urls}",
        f"output={out}",
        "allow_networks=[127.0.0.1/32]",
        "timeout=1",
        "retries=1",
        "retry_backoff=0.05",
        "image_size=64",
        "max_bytes=1048576",
        "processes=1",
        *extra,
    ]


@pytest.mark.slow
def test_a_second_crawl_on_the_same_folder_refuses_or_waits(tmp_path):
    world = World(world_config(latency=0.05))
    with WorldServer(world) as server:
        urls, _ = world.write(tmp_path, server.base_url)
        out = tmp_path / "raw"
        first = subprocess.Popen(
            crawl_command(urls, out, "concurrency=2"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not os.path.exists(out / "_lock.json"):
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.02)
        second = subprocess.run(crawl_command(urls, out), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: output {out} is being written by crawl (pid {first.pid} on ")
        third = subprocess.Popen(
            crawl_command(urls, out, "wait_for_lock=true"), cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err[-2000:]
        files = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/**", recursive=True) if os.path.isfile(p)}
        third_out, _ = third.communicate(timeout=300)
    assert third.returncode == 0
    assert "waiting for crawl (pid" in third_out and "is already complete" in third_out
    after = {p: os.stat(p).st_mtime_ns for p in glob.glob(f"{out}/**", recursive=True) if os.path.isfile(p)}
    assert after == files and not os.path.exists(out / "_lock.json")  # the waiter found it done, touched nothing


@pytest.mark.slow
def test_kill_9_while_planning_then_the_same_command_completes_as_a_clean_crawl(ray_local, tmp_path):
    world = World(world_config(n=60))
    with WorldServer(world) as server:
        urls, _ = world.write(tmp_path, server.base_url)
        table = pq.read_table(urls)
        rows = 200_000  # mostly repeats of the 60 URLs (and some empty ones): seconds to plan, nothing to fetch
        index = np.arange(rows) % 61
        repeated = pa.table(
            {
                "url": pa.array([None if i == 60 else table["url"][int(i)].as_py() for i in index], pa.string()),
                "caption": pa.array([f"row {r}" for r in range(rows)], pa.string()),
            }
        )
        big = tmp_path / "big.parquet"
        pq.write_table(repeated, big, row_group_size=10_000)
        out = tmp_path / "raw"
        command = crawl_command(big, out, "number_sample_per_shard=20000", "progress=false")

        def planning() -> bool:  # part of the plan (its spill, or shard plan files) written, plan.json not yet
            written = [p for p in glob.glob(f"{out}/_work/**", recursive=True) if os.path.isfile(p)]
            return bool(written) and not os.path.exists(out / "_work" / "plan.json")

        kill_when(command, planning, poll_s=0.005)
        assert not os.path.exists(out / "_work" / "plan.json")
        run_in_process(crawl, command)  # the resume
        clean = crawl(crawl_config(f"input={big}", f"output={tmp_path / 'clean'}", "number_sample_per_shard=20000"))
    manifest = json.load(open(out / "manifest.json"))
    distinct = len(set(table["url"].to_pylist()))  # the world repeats a few URLs itself
    assert manifest["counts"]["rows"] == rows and manifest["counts"]["duplicate"] == rows - rows // 61 - distinct
    assert manifest["content_hash"] == clean["content_hash"]
    assert not [p for p in glob.glob(f"{out}/**", recursive=True) if ".tmp-" in p]
