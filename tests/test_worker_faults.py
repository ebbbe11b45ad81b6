"""A Ray worker killed with -9 in the middle of a unit of crawl or annotate, or in the middle of Ray Train
training: the run finishes on its own, with the outputs an undisturbed run writes, and its summary says what
was run again (the unit, or the restart and the step it resumed from)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import tarfile
import threading
import time

import pyarrow.parquet as pq
import pytest
from hydra.utils import instantiate
from transformers import CLIPModel

from pipeline.annotate.run import annotate
from pipeline.crawl.run import crawl
from pipeline.errors import StageError
from pipeline.stage import ATTEMPTS, DONE, MAX_ATTEMPTS, note_attempt
from pipeline.storage import Location
from pipeline.world import World, WorldServer
from pipeline.world.shards import write_world_shards
from support import checkpoint_step, crawl_config, stage_config, world_config

# Timing fields of a crawl shard's stats: everything else in them is the same on every run.
CLOCK_FIELDS = ("duration", "start_time", "end_time", "worker_peak_rss_bytes")


class UnitKiller(threading.Thread):
    """Kills -9 the Ray worker that runs a unit of the stage writing `out`, `delay_s` after the unit started:
    the first unit with an attempt note (`_work/attempts/`, which names the worker's pid) and no done record.
    `killed` is that unit, None when every unit was done before it could act."""

    def __init__(self, out, delay_s: float):
        super().__init__(daemon=True)
        self.out, self.delay_s, self.killed, self.stop = str(out), delay_s, None, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            for note in sorted(glob.glob(f"{self.out}/{ATTEMPTS}/*.json")):
                unit = os.path.basename(note).removesuffix(".json")
                try:
                    pid = json.load(open(note))["pid"]
                except (OSError, ValueError):  # renamed away as we read it
                    continue
                if self._done(unit):
                    continue
                time.sleep(self.delay_s)
                if not self._done(unit):
                    os.kill(pid, signal.SIGKILL)
                    self.killed = unit
                return

    def _done(self, unit: str) -> bool:
        return os.path.exists(f"{self.out}/{DONE}/{unit}.json")


def killing(out, delay_s: float, run):
    """`run()` while a UnitKiller watches `out`; returns (what run returned, the unit killed)."""
    killer = UnitKiller(out, delay_s)
    killer.start()
    try:
        result = run()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "every unit was done before the worker could be killed"
    return result, killer.killed


def tar_members(path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}


def crawl_outputs(folder) -> dict:
    """What a crawl wrote, clocks aside: every parquet row, every tar member's content hash, every stats file."""
    outputs = {}
    for path in sorted(glob.glob(f"{folder}/0*")):
        name = os.path.basename(path)
        if name.endswith(".parquet"):
            outputs[name] = sorted(pq.read_table(path).to_pylist(), key=lambda r: r["key"])
        elif name.endswith(".tar"):
            outputs[name] = tar_members(path)
        elif name.endswith("_stats.json"):
            outputs[name] = {k: v for k, v in json.load(open(path)).items() if k not in CLOCK_FIELDS}
    return outputs


def annotate_outputs(folder) -> dict:
    return {os.path.basename(p): pq.read_table(p).to_pylist() for p in sorted(glob.glob(f"{folder}/0*.parquet"))}


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory):
    """60 URLs (the world's faults included), every answer 0.2 s late: a shard of 10 takes a second or more."""
    world = World(world_config(n=60, latency=0.2))
    folder = tmp_path_factory.mktemp("slow_world")
    with WorldServer(world) as server:
        urls, _ = world.write(folder, server.base_url)
        yield urls


@pytest.mark.slow
def test_a_crawl_whose_worker_is_killed_mid_shard_ends_as_an_undisturbed_one(ray_local, slow_world, tmp_path, capsys):
    options = [f"input={slow_world}", "number_sample_per_shard=10", "concurrency=2", "processes=2"]
    clean = crawl(crawl_config(*options, f"output={tmp_path / 'clean'}"))
    assert clean["units_retried_after_worker_death"] == {} and "after a worker died" not in capsys.readouterr().out
    out = tmp_path / "killed"
    started = time.time()
    killed, unit = killing(out, 0.2, lambda: crawl(crawl_config(*options, f"output={out}")))
    seconds = time.time() - started
    printed = capsys.readouterr().out
    print(f"crawl with a killed worker: {seconds:.1f}s, unit {unit} run again")

    assert killed["units_retried_after_worker_death"] == {unit: 2}
    assert f"retried 1 unit(s) after a worker died: {unit}" in printed
    assert killed["counts"] == clean["counts"] and killed["content_hash"] == clean["content_hash"]
    assert crawl_outputs(out) == crawl_outputs(tmp_path / "clean")
    assert not glob.glob(f"{out}/**/*.tmp-*", recursive=True)  # the dead worker's half-written files are gone


@pytest.mark.slow
def test_annotate_whose_worker_is_killed_mid_shard_ends_as_an_undisturbed_one(ray_local, tmp_path, capsys):
    raw = write_world_shards(tmp_path / "raw", 240, 80, image_size=64)
    clean = annotate(stage_config("annotate", f"input={raw}", f"output={tmp_path / 'clean'}", "progress=false"))
    capsys.readouterr()
    out = tmp_path / "killed"
    started = time.time()

    def run():
        return annotate(stage_config("annotate", f"input={raw}", f"output={out}", "progress=false"))

    killed, unit = killing(out, 0.05, run)  # a shard of 80 takes a few tenths of a second or more
    seconds = time.time() - started
    printed = capsys.readouterr().out
    print(f"annotate with a killed worker: {seconds:.1f}s, unit {unit} run again")

    assert killed["units_retried_after_worker_death"] == {unit: 2}
    assert f"retried 1 unit(s) after a worker died: {unit}" in printed
    assert killed["counts"] == clean["counts"] == {"shards": 3, "samples": 240, "unreadable": 0}
    assert killed["content_hash"] == clean["content_hash"]
    assert annotate_outputs(out) == annotate_outputs(tmp_path / "clean")


def test_a_unit_that_kills_every_worker_ends_the_run_in_one_line(tmp_path):
    """Ray Data would run it again forever; its attempt notes stop it after MAX_ATTEMPTS, and a new pass (a
    rerun) counts from 1 again."""
    out = Location(str(tmp_path))
    out.makedirs(ATTEMPTS)
    assert [note_attempt(out, "00003", "pass-1") for _ in range(MAX_ATTEMPTS)] == list(range(1, MAX_ATTEMPTS + 1))
    with pytest.raises(StageError, match=f"unit 00003 of {tmp_path}: its worker died {MAX_ATTEMPTS} times"):
        note_attempt(out, "00003", "pass-1")
    assert note_attempt(out, "00003", "pass-2") == 1


def ray_train_workers() -> list[int]:
    """Pids of the Ray Train worker processes of this test's Ray (descendants of this process: its raylet's
    children), never those of another Ray on the machine."""
    parents, titles = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            titles[int(entry)] = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")[0].decode()
        except (OSError, ValueError, IndexError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return sorted(p for p, title in titles.items() if title.startswith("ray::RayTrainWorker") and ours(p))


class TrainWorkerKiller(threading.Thread):
    """Kills -9 one Ray Train worker as soon as `checkpoint` holds step `at_step` or later; `killed_at` is the
    step it held then."""

    def __init__(self, checkpoint, at_step: int):
        super().__init__(daemon=True)
        self.checkpoint, self.at_step, self.killed_at, self.stop = checkpoint, at_step, None, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            step = checkpoint_step(self.checkpoint)
            workers = ray_train_workers() if step >= self.at_step else []
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                self.killed_at = step
                return


@pytest.mark.slow
def test_ray_train_restarts_a_killed_worker_from_the_last_checkpoint(ray_local, tmp_path, capsys):
    """2 DDP workers under Ray Train (this test's local Ray), a checkpoint every step; one worker killed at
    step 10 or so: Ray Train starts both again, they resume from last.ckpt and finish at the same final step,
    with a whole export, and the launcher says it restarted them."""
    steps = 40
    shards = write_world_shards(tmp_path / "shards", 64, 64, image_size=32)
    run = tmp_path / "run"
    cfg = stage_config(
        "train",
        *(f"data.path={shards}", f"output={run}", "launcher=ray", "launcher.num_workers=2"),
        *("data.batch_size=8", "data.num_workers=0", f"trainer.max_steps={steps}", "checkpoint_every=1"),
        *("tracking=false", "trainer.enable_progress_bar=false"),
    )
    last = run / "checkpoints" / "last.ckpt"
    killer = TrainWorkerKiller(last, at_step=10)
    killer.start()
    started = time.time()
    try:
        instantiate(cfg.launcher)(cfg)
    finally:
        killer.stop.set()
        killer.join()
    printed = capsys.readouterr().out
    print(f"ray train with a killed worker: {time.time() - started:.1f}s, killed at step {killer.killed_at}")

    assert killer.killed_at is not None and 10 <= killer.killed_at < steps, "training ended before the kill"
    assert checkpoint_step(last) == steps
    assert "Ray Train: 2 worker(s) finished (ddp); metric " in printed and "; metric nan" not in printed
    assert "; restarted 1 time(s) after a worker died, resumed from step " in printed, printed[-2000:]
    resumed = int(printed.split("resumed from step ")[1].split()[0])
    assert killer.killed_at <= resumed < steps  # from the checkpoint it had (or a later one), not from the start
    CLIPModel.from_pretrained(run / "clip")  # the export is whole
