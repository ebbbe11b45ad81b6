"""One writer per output folder: a second run refuses in one line naming the holder, or waits for it; a lock
left by a dead process is taken over. Holders are real other processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.annotate.run import annotate
from pipeline.errors import StageError
from pipeline.filter.run import filter_samples
from pipeline.lock import STALE_AFTER_S, output_lock
from pipeline.shard.run import shard
from pipeline.storage import LOCK, Location
from support import ROOT, stage_config

HOLDER = """
import sys, time
from pipeline.lock import output_lock
from pipeline.storage import Location
with output_lock(Location(sys.argv[1]), "a test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(folder, seconds: float) -> subprocess.Popen:
    """Another process that takes `folder`'s lock and keeps it for `seconds`; returns once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def released_later(process: subprocess.Popen) -> float:
    """Seconds until the holder gives the lock back (it exits right after)."""
    started = time.time()
    process.wait(timeout=60)
    return time.time() - started


class Waiting(threading.Thread):
    """`run(out, "wait_for_lock=true")` in a thread, started at once."""

    def __init__(self, run, out):
        super().__init__()
        self.run_stage, self.out, self.manifest = run, out, None
        self.start()

    def run(self):
        self.manifest = self.run_stage(self.out, "wait_for_lock=true")

    def result(self) -> dict:
        self.join(timeout=120)
        return self.manifest


def test_a_held_folder_is_refused_in_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, 30)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.filter", f"input={tmp_path}/meta", f"output={out}", "tracking=false"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: output {out} is being written by a test holder (pid {holder.pid} on ")
        assert line.endswith("wait for it to end, or pass wait_for_lock=true")
        record = json.load(open(out / LOCK))
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, 60)
    holder.kill()  # kill -9: no chance to give the lock back
    holder.wait()
    assert os.path.exists(out / LOCK)
    with output_lock(Location(str(out)), "next run"):
        assert json.load(open(out / LOCK))["pid"] == os.getpid()
    assert not os.path.exists(out / LOCK)


def test_reused_pids_and_silent_hosts_count_as_dead(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"stage": "crawl", "pid": os.getpid(), "host": socket.gethostname(), "taken_at": 0, "heartbeat": 0}
    for record in (
        {**mine, "process_start": "1"},  # this pid, but a process that started at another time
        {**mine, "host": "elsewhere", "heartbeat": time.time() - STALE_AFTER_S - 1},
    ):
        (out / LOCK).write_text(json.dumps(record))
        with output_lock(Location(str(out)), "next run"):
            pass
        assert "no longer running" in capsys.readouterr().out
    # A live holder on another host (fresh heartbeat) is respected.
    (out / LOCK).write_text(json.dumps({**mine, "host": "elsewhere", "heartbeat": time.time()}))
    with pytest.raises(StageError, match=r"being written by crawl \(pid \d+ on elsewhere"):
        with output_lock(Location(str(out)), "next run"):
            pass


def test_annotate_and_shard_refuse_a_held_output_and_wait_with_wait_for_lock(
    default_world_raw, annotated, tiny_clip, tmp_path
):
    raw, _ = default_world_raw
    meta_dir, meta_manifest = annotated
    sel = tmp_path / "sel"
    filter_samples(stage_config("filtering", f"input={meta_dir}", f"output={sel}", "tracking=false"))
    runs = {
        "annotate": lambda out, *o: annotate(
            stage_config("annotate", f"input={raw}", f"output={out}", f"clip={tiny_clip}", "progress=false", *o)
        ),
        "shard": lambda out, *o: shard(
            stage_config(
                "shard",
                f"input={raw}",
                f"selection={sel}",
                f"output={out}",
                "samples_per_shard=50",
                "progress=false",
                *o,
            )
        ),
    }
    for name, run in runs.items():
        out = tmp_path / name
        holder = hold(out, 4)
        with pytest.raises(StageError, match=f"output {out} is being written by a test holder"):
            run(out)
        waiting = Waiting(run, out)
        holding_for = released_later(holder)
        manifest = waiting.result()
        assert holding_for > 1 and manifest["stage"] == name  # it waited, then did the whole work
        assert not os.path.exists(out / LOCK) and os.path.exists(out / "manifest.json")
    assert json.load(open(tmp_path / "annotate" / "manifest.json"))["content_hash"] == meta_manifest["content_hash"]
