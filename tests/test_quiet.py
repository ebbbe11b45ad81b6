"""What a user reads: native lines written straight to file descriptor 2 (Ray's C++ core worker) go to the log
file when they are known noise, and everything else on descriptor 2 passes through unchanged; so do the lines
Ray's own processes forward to the driver."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from training.quiet import _Native, _Route, native_lines_to_log, quiet

RAY_LINE = (
    b"[2026-12-07 15:37:50,627 E 8659 8659] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
    b"UnitActor))' and ID: 'f86a' has constructor arguments in the object store and max_restarts > 0. If the "
    b"arguments in the object store go out of scope or are lost, the actor restart will fail.\n"
)
NOISE = b"has constructor arguments in the object store and max_restarts > 0"


@pytest.fixture
def routing(monkeypatch):
    """quiet()'s routing for one test, put back as it was after (other tests' commands set it too)."""
    for name in ("on", "log_file", "handlers"):
        monkeypatch.setattr(_Route, name, getattr(_Route, name))
    monkeypatch.setattr(_Native, "routed", set())


def test_native_noise_goes_to_the_log_and_the_rest_passes_as_it_came(routing, tmp_path, capfd):
    quiet(OmegaConf.create({"output": str(tmp_path / "run")}))
    with native_lines_to_log(NOISE):
        os.write(2, b"crawl:   0%|          | 0/20")  # a progress bar: no newline, then carriage returns
        os.write(2, b"(MapWorker pid=12) " + RAY_LINE)  # a worker's, as Ray forwards it
        os.write(2, b"\rcrawl: 100%|##########| 20/20\n")
        os.write(2, b"[2026-12-07 15:37:51,000 E 8659 8659] raylet.cc:1: something else went wrong\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == (
        "crawl:   0%|          | 0/20\rcrawl: 100%|##########| 20/20\n"
        "[2026-12-07 15:37:51,000 E 8659 8659] raylet.cc:1: something else went wrong\nafter\n"
    )
    log = (tmp_path / "run" / "pixelmill.log").read_text()
    assert "has constructor arguments in the object store" in log and "core_worker.cc:2465" in log
    assert "something else" not in log

    # Ray prints it once per process: a later stage of the same process leaves descriptor 2 alone
    with native_lines_to_log(NOISE):
        os.write(2, b"second stage\n")
        assert not os.readlink("/proc/self/fd/2").startswith("pipe:")
    assert capfd.readouterr().err == "second stage\n"


def test_without_quiet_nothing_is_redirected(routing, capfd):
    _Route.on = False
    with native_lines_to_log(NOISE):
        os.write(2, RAY_LINE)
    assert capfd.readouterr().err == RAY_LINE.decode()


def test_an_unwritable_log_loses_the_line_not_the_console(routing, tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    quiet(OmegaConf.create({"output": str(blocker / "run")}))  # its folder cannot be made
    with native_lines_to_log(NOISE):
        os.write(2, RAY_LINE + b"still here\n")
    assert capfd.readouterr().err == "still here\n"


GCS_NOISE = (
    "[2026-12-07 21:35:01,848 E 11715 11715] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
    "a0e333c7, return status: Invalid: KillActor RPC failed for actor a0e333c7"
)
FORWARDED = f"""
import sys
from omegaconf import OmegaConf
from training.quiet import quiet
from pipeline.ray_setup import init_ray
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

quiet(OmegaConf.create({{"output": sys.argv[1]}}))
init_ray(1)
base = {{"ip": "127.0.0.1", "localhost": "127.0.0.1", "job": "", "is_err": True, "actor_name": "", "task_name": ""}}
dispatcher.emit({{**base, "pid": "gcs_server", "lines": [{GCS_NOISE!r}, "gcs: something real went wrong"]}})
dispatcher.emit({{**base, "pid": "gcs_server", "lines": [{GCS_NOISE!r}]}})
dispatcher.emit({{**base, "pid": 4242, "lines": ["a worker's own line"]}})
"""


def test_ray_system_noise_goes_to_the_log_and_real_errors_to_the_console(tmp_path):
    """A local Ray started by a stage (`init_ray`) forwards its GCS's lines to the driver's console; its
    failed kills of actors that had already exited go to pixelmill.log, its other lines and the workers'
    still print (through Ray's own printer)."""
    import subprocess
    import sys

    from support import subprocess_env

    done = subprocess.run(
        [sys.executable, "-c", FORWARDED, str(tmp_path / "run")],
        env=subprocess_env(f"sqlite:///{tmp_path}/mlflow.db"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-2000:]
    assert "gcs: something real went wrong" in console and "a worker's own line" in console
    assert "Failed to kill actor" not in console
    log = (tmp_path / "run" / "pixelmill.log").read_text()
    assert log.count("Failed to kill actor") == 2 and "something real" not in log
