"""What a user reads: native lines written straight to file descriptor 2 (Ray's C++ core worker) go to the log
file when they are known noise, and everything else on descriptor 2 passes through unchanged."""

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
