"""The one stage driver: a stage says what its work is; `drive(stage)` claims the output, skips a finished one,
plans, maps the units not yet done, and writes the manifest last.

Resume layout, the same for every stage: `{output}/_work/plan.json` (the run's identity and its unit ids,
written after the stage's own plan files under `_work/`) and `{output}/_work/done/{unit}.json` (what a unit
returned, written atomically after the unit's own output). A killed run of the same identity is rerun with
the units that have no done record; a done record therefore means a whole unit, and nothing else does.

A Ray worker that dies mid-unit (killed, out of memory) does not end the run: Ray Data starts the actor again
and reruns the unit's task on it (its actor pools default to `max_restarts=-1, max_task_retries=-1`), and the
unit's output is rewritten whole, as after a resume. Each unit notes its attempts in
`_work/attempts/{unit}.json` as it starts (with the pass it belongs to and the worker's pid), so the summary
says which units ran again, and a unit that kills every worker it meets ends the run instead of looping.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pipeline.errors import StageError
from pipeline.lock import output_lock
from pipeline.ray_setup import NATIVE_NOISE, actor_count, init_ray, quiet_ray_data
from pipeline.storage import MANIFEST, Location, claim_output, write_manifest
from training.quiet import native_lines_to_log

WORK = "_work"
PLAN = f"{WORK}/plan.json"
DONE = f"{WORK}/done"
ATTEMPTS = f"{WORK}/attempts"
# Attempts at one unit in one pass. Ray Data would retry a unit whose worker died forever (and its
# `max_task_retries` can only be set through `ray_remote_args`, deprecated in Ray 2.60), so the unit's own
# attempt note stops it: one that kills every worker it meets (out of memory on one input) ends the run in
# one line, and a rerun resumes with the units that were done.
MAX_ATTEMPTS = 4


@dataclass
class Run:
    """What the driver hands back to the stage: the plan record, every unit's done record (plan order), the
    records this run produced in each pass, the units Ray ran again after a worker died in them (with their
    attempts), and the seconds spent mapping."""

    plan: dict
    done: dict[str, dict] = field(default_factory=dict)
    fresh: dict[str, dict] = field(default_factory=dict)
    again: dict[str, dict] = field(default_factory=dict)
    worker_retries: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Finished:
    """What a stage's `finish` returns: the manifest's counts and output hashes, its extra fields, a summary."""

    counts: dict
    file_hashes: dict[str, str]
    extra: dict = field(default_factory=dict)
    summary: str = ""


class Stage:
    """What a stage provides. Subclasses set the attributes in `__init__` and implement `plan`, `finish`, and
    either `worker` (a class the driver instantiates once per Ray actor and calls with one unit id) or `map`
    (their own Ray pipeline, yielding each unit's record on the driver)."""

    name: str  # the manifest's `stage` and the messages' prefix
    what: str  # how a refusal to overwrite names this stage's output ("a crawl")
    cfg: dict  # resolved config; `ray.num_cpus`, `processes` and `progress` are read by the driver
    output: Location
    identity: str  # equal identities, equal outputs: a finished output of it is not redone
    keep_work: bool = False  # keep `_work/` after the manifest (a later run of the same output needs it)
    redo_when_complete: bool = False  # run even when the manifest says done (crawl's retry_failed)
    started: float = 0.0

    def describe(self, manifest: dict) -> str:
        """The parenthesised part of "… is already complete (…); nothing to do"."""
        return f"{manifest['counts']['samples']} samples"

    def plan(self, work: Location) -> dict:
        """Write the stage's own plan files under `work` and return the plan record: `units` (ids usable in a
        file name) and anything else the stage wants back in `Run.plan`."""
        raise NotImplementedError

    def worker(self, retry: bool) -> tuple[type, dict]:
        """(class, constructor kwargs): `cls(**kwargs)(unit) -> record`, run on Ray actors. Called after Ray is
        up, so a stage may decide from the cluster's resources."""
        raise NotImplementedError

    def resources(self) -> tuple[dict, int | None]:
        """(Ray resources per actor, number of actors or None for `processes`, else one per CPU Ray offers)."""
        return {"num_cpus": 1}, None

    map = None  # or a method `map(units, bar, attempts)` yielding (unit, record) on the driver; its workers call
    # `note_attempt(output, unit, attempts)` as each unit starts

    def retry_units(self, run: Run) -> list[str]:
        """Units to run a second time, with `worker(retry=True)`, after every unit is done."""
        return []

    def bar(self, run: Run, units: list[str], retry: bool) -> dict:
        """tqdm's total, desc and unit for one pass."""
        return {"total": len(units), "desc": self.name, "unit": "unit"}

    def advance(self, bar, record: dict) -> None:
        bar.update(1)

    def finish(self, run: Run) -> Finished:
        raise NotImplementedError


def already_complete(name: str, out: Location, identity: str, describe) -> dict | None:
    """The manifest of a finished output of the same identity, announced; None when there is work to do."""
    if not out.exists(MANIFEST):
        return None
    manifest = out.read_json(MANIFEST)
    if manifest.get("identity") != identity:
        return None
    print(f"{name}: {out.url} is already complete ({describe(manifest)}); nothing to do")
    return manifest


def done_name(unit: str) -> str:
    return f"{DONE}/{unit}.json"


def record_done(out: Location, unit: str, record: dict) -> dict:
    out.write_json(done_name(unit), record)
    return record


def note_attempt(out: Location, unit: str, attempts: str) -> int:
    """Note that `unit` starts in the pass named `attempts`, on this worker; returns which attempt this is. Only
    a worker that died mid-unit makes a second one in the same pass (Ray ran the unit again)."""
    name = f"{ATTEMPTS}/{unit}.json"
    previous = out.read_json(name) if out.exists(name) else {}
    attempt = previous["attempt"] + 1 if previous.get("pass") == attempts else 1
    if attempt > MAX_ATTEMPTS:  # an exception of the unit's own: Ray does not retry it, the run ends here
        raise StageError(
            f"unit {unit} of {out.url}: its worker died {attempt - 1} times while running it (out of memory? "
            f"killed?); giving up after {MAX_ATTEMPTS} attempts. A rerun resumes with the units that are done"
        )
    out.write_json(name, {"pass": attempts, "attempt": attempt, "pid": os.getpid(), "host": socket.gethostname()})
    return attempt


def worker_retries(out: Location, units, attempts: str) -> dict[str, int]:
    """unit → attempts, for the units of the pass `attempts` that ran more than once."""
    retried = {}
    for unit in units:
        name = f"{ATTEMPTS}/{unit}.json"
        noted = out.read_json(name) if out.exists(name) else {}
        if noted.get("pass") == attempts and noted["attempt"] > 1:
            retried[unit] = noted["attempt"]
    return retried


class UnitActor:
    """Ray Data callable class around a stage's worker: each call runs one unit, then records it as done on
    the worker itself, so that a driver killed later never makes a finished unit run again."""

    def __init__(self, worker_class: type, worker_kwargs: dict, output_url: str, attempts: str):
        self.worker = worker_class(**worker_kwargs)
        self.output, self.attempts = Location(output_url), attempts

    def __call__(self, batch: dict) -> dict:
        records = []
        for unit in map(str, batch["unit"]):
            note_attempt(self.output, unit, self.attempts)
            records.append(json.dumps(record_done(self.output, unit, self.worker(unit))))
        return {"unit": np.asarray(batch["unit"]), "record": np.asarray(records)}


def _claim(stage: Stage) -> dict:
    """The plan of an interrupted run of the same identity, or a new one; refuses to mix another run's output."""
    out = stage.output
    existing = claim_output(out, PLAN, stage.identity, bool(stage.cfg.get("overwrite")), stage.what)
    if existing:
        return existing
    work = Location(f"{out.url}/{WORK}")
    work.makedirs("done")
    record = {**stage.plan(work), "identity": stage.identity}
    work.write_json("plan.json", record)  # last: a plan.json means every plan file is there
    return record


def _map(stage: Stage, units: list[str], retry: bool, local: bool, bar, attempts: str):
    """Yield (unit, record) as units finish; their done records are written by then."""
    if stage.map is not None:
        for unit, record in stage.map(units, bar, attempts):
            yield unit, record_done(stage.output, unit, record)
        return
    if local:  # in this process, one unit after another: the same actor code, without Ray
        actor = UnitActor(*stage.worker(retry), stage.output.url, attempts)
        for unit in units:
            yield unit, json.loads(actor({"unit": [unit]})["record"][0])
        return
    import ray

    init_ray(stage.cfg["ray"]["num_cpus"])
    quiet_ray_data()
    worker_class, kwargs = stage.worker(retry)
    resources, actors = stage.resources()
    dataset = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units)).map_batches(
        UnitActor,
        fn_constructor_kwargs={
            "worker_class": worker_class,
            "worker_kwargs": kwargs,
            "output_url": stage.output.url,
            "attempts": attempts,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actor_count(actors or stage.cfg.get("processes"), len(units))),
        **resources,
    )
    with native_lines_to_log(*NATIVE_NOISE):  # Ray's C++ notice about actor pools: to the log
        for row in dataset.iter_rows():
            yield str(row["unit"]), json.loads(row["record"])


def _pass(stage: Stage, run: Run, units: list[str], retry: bool, local: bool) -> dict[str, dict]:
    results: dict[str, dict] = {}
    if not units:
        return results
    stage.output.remove(MANIFEST)  # the output is changing: it is no longer the finished one
    stage.output.makedirs(ATTEMPTS)
    # Names this pass in the attempt notes: a unit noted twice under it was run twice by this pass.
    attempts = f"{os.getpid()}-{time.time_ns()}-{'retry' if retry else 'first'}"
    progress = bool(stage.cfg.get("progress", True))
    with tqdm(**stage.bar(run, units, retry), disable=not progress, smoothing=0) as bar:
        for unit, record in _map(stage, units, retry, local, bar, attempts):
            results[unit] = record
            if stage.map is None:
                stage.advance(bar, record)
    retried = worker_retries(stage.output, units, attempts)
    if retried:  # every unit is done: no writer is left, and a dead one's half-written files can go
        stage.output.remove_temporaries()
    run.worker_retries.update(retried)
    return results


def drive(stage: Stage, local: bool = False) -> dict:
    """Run `stage` to a finished output; returns its manifest. `local` maps units in this process (tests).
    The output's lock is held throughout: one writer per folder (`wait_for_lock=true` waits for it)."""
    with output_lock(stage.output, stage.name, bool(stage.cfg.get("wait_for_lock"))):
        return _drive(stage, local)


def _drive(stage: Stage, local: bool) -> dict:
    started = stage.started or time.time()
    out = stage.output
    if not stage.redo_when_complete:
        manifest = already_complete(stage.name, out, stage.identity, stage.describe)
        if manifest:
            return manifest
    run = Run(plan=_claim(stage))
    out.remove_temporaries()  # a killed writer's leftovers, at any depth; never visible under a final name
    units = [str(u) for u in run.plan["units"]]
    mapping = time.time()
    run.fresh = _pass(stage, run, [u for u in units if not out.exists(done_name(u))], False, local)
    run.done = {u: out.read_json(done_name(u)) for u in units}
    again = stage.retry_units(run)
    for unit in again:  # unrecorded while rewritten: a kill here leaves units that the next run does again
        out.remove(done_name(unit))
    run.again = _pass(stage, run, again, True, local)
    run.done.update(run.again)
    run.seconds = time.time() - mapping
    finished = stage.finish(run)
    manifest = write_manifest(
        out,
        stage.name,
        stage.cfg,
        finished.counts,
        finished.file_hashes,
        started,
        identity=stage.identity,
        units_retried_after_worker_death=run.worker_retries,
        **finished.extra,
    )
    if not stage.keep_work:
        out.remove(WORK)  # after the manifest: a rerun finds the manifest and does nothing
    summary = "\n".join(filter(None, [finished.summary, retries_line(run.worker_retries)]))
    if summary:
        print(summary)
    return manifest


def retries_line(retried: dict[str, int]) -> str:
    """The summary's line about units that Ray ran again after their worker died ("" when none)."""
    if not retried:
        return ""
    units = ", ".join(f"{u} ({n} attempts)" if n > 2 else u for u, n in sorted(retried.items()))
    return f"  retried {len(retried)} unit(s) after a worker died: {units}"
