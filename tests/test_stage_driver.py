"""`pipeline.stage.drive` on a toy stage, units mapped in this process (no Ray): a finished output is not
redone, a failed unit leaves the others done and a rerun does only it, and the manifest comes last."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.stage import DONE, PLAN, WORK, Finished, Run, Stage, drive
from pipeline.storage import MANIFEST, Location

UNITS = ["a", "b", "c"]


class Squarer:
    """Writes `{unit}.txt`; raises for the units named in `fail_on` (a file, so that a test can heal it)."""

    def __init__(self, output: str, fail_on: str, calls: str):
        self.output, self.fail_on, self.calls = Location(output), fail_on, calls

    def __call__(self, unit: str) -> dict:
        with open(self.calls, "a") as f:
            f.write(unit + "\n")
        if os.path.exists(self.fail_on) and unit in open(self.fail_on).read().split():
            raise RuntimeError(f"unit {unit} failed")
        assert not self.output.exists(MANIFEST), "a manifest while units still run"
        value = UNITS.index(unit) ** 2
        with self.output.open_atomic(f"{unit}.txt", "w") as f:
            f.write(str(value))
        return {"unit": unit, "value": value}


class ToyStage(Stage):
    name, what = "toy", "a toy output"

    def __init__(self, output, tmp_path, keep_work=False, power=2):
        self.cfg = {"output": str(output), "power": power, "progress": False}
        self.output, self.identity, self.keep_work = Location(str(output)), f"toy-{power}", keep_work
        self.fail_on, self.calls = str(tmp_path / "fail_on"), str(tmp_path / "calls")

    def plan(self, work: Location) -> dict:
        return {"units": UNITS}

    def worker(self, retry: bool):
        return Squarer, {"output": self.output.url, "fail_on": self.fail_on, "calls": self.calls}

    def finish(self, run: Run) -> Finished:
        # The manifest comes after this: every unit is done and recorded, and nothing says finished yet.
        assert list(run.done) == UNITS and all(self.output.exists(f"{DONE}/{u}.json") for u in UNITS)
        assert not self.output.exists(MANIFEST)
        counts = {"samples": sum(r["value"] for r in run.done.values()), "ran": sorted(run.fresh)}
        return Finished(counts, {f"{u}.txt": str(r["value"]) for u, r in run.done.items()})


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls"
    return open(path).read().split() if path.exists() else []


def test_a_finished_output_is_not_redone(tmp_path, capsys):
    out = tmp_path / "out"
    first = drive(ToyStage(out, tmp_path), local=True)
    assert first["counts"] == {"samples": 0 + 1 + 4, "ran": UNITS} and first["identity"] == "toy-2"
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt", "c.txt", MANIFEST]  # `_work/` removed after the manifest
    again = drive(ToyStage(out, tmp_path), local=True)
    assert again == first and calls(tmp_path) == UNITS
    assert f"toy: {out} is already complete (5 samples); nothing to do" in capsys.readouterr().out


def test_a_failed_unit_is_the_only_one_run_again(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "fail_on").write_text("b")
    with pytest.raises(RuntimeError, match="unit b failed"):
        drive(ToyStage(out, tmp_path), local=True)
    assert sorted(os.listdir(out / DONE)) == ["a.json"]  # c never ran: units run one after another here
    assert not (out / MANIFEST).exists() and json.load(open(out / PLAN))["units"] == UNITS
    (tmp_path / "fail_on").write_text("")
    manifest = drive(ToyStage(out, tmp_path), local=True)
    assert calls(tmp_path) == ["a", "b", "b", "c"]  # a was not run again
    assert manifest["counts"] == {"samples": 5, "ran": ["b", "c"]}
    assert not (out / WORK).exists()


def test_another_identity_is_refused_and_kept_work_stays(tmp_path):
    from pipeline.errors import StageError

    out = tmp_path / "out"
    drive(ToyStage(out, tmp_path, keep_work=True), local=True)
    assert sorted(os.listdir(out / DONE)) == ["a.json", "b.json", "c.json"]
    with pytest.raises(StageError, match="another input or config"):
        drive(ToyStage(out, tmp_path, keep_work=True, power=3), local=True)


def test_a_run_killed_while_planning_starts_over_and_leftovers_at_any_depth_go(tmp_path):
    out = tmp_path / "out"
    (out / WORK / "done").mkdir(parents=True)
    (out / WORK / "00000.parquet").write_text("half a plan")  # no plan.json: killed before the plan was whole
    (out / WORK / "done" / "a.json.tmp-1234abcd").write_text("{")
    manifest = drive(ToyStage(out, tmp_path), local=True)
    assert manifest["counts"]["ran"] == UNITS and not (out / WORK / "00000.parquet").exists()
    # Killed after planning, with a writer's temporary deep inside: the rerun resumes and removes it.
    resumed = tmp_path / "resumed"
    stage = ToyStage(resumed, tmp_path, keep_work=True)
    drive(stage, local=True)
    os.remove(resumed / MANIFEST)
    os.remove(resumed / DONE / "c.json")
    (resumed / "nested" / "deep").mkdir(parents=True)
    (resumed / "nested" / "deep" / "x.tar.tmp-deadbeef").write_text("partial")
    assert drive(ToyStage(resumed, tmp_path, keep_work=True), local=True)["counts"]["ran"] == ["c"]
    leftovers = [os.path.join(r, f) for d in (out, resumed) for r, _, fs in os.walk(d) for f in fs if ".tmp-" in f]
    assert leftovers == []
    # A folder holding anything else than a run's beginnings is still refused.
    other = tmp_path / "other"
    (other / WORK).mkdir(parents=True)
    (other / "precious.txt").write_text("mine")
    with pytest.raises(Exception, match="is not empty and holds no a toy output"):
        drive(ToyStage(other, tmp_path), local=True)
    assert (other / "precious.txt").exists()
