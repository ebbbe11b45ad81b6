"""Every MLflow call of a run goes through a `TrackedRun`: written to a journal in the output folder, then sent
to the tracking store in order by a background thread. While the store does not answer, calls wait in the
journal and the run carries on (one warning); the thread probes the store every `PIXELMILL_TRACKING_RETRY_S`
seconds (30) and replays the journal into the same run when it answers. What is left when the run ends (the
store still down, or the process killed) is sent by `python -m training.tracking sync <output>`, and by the
next run that logs from the same folder (a resumed training).

Layout, in `<output>/mlflow_journal/` (in `./mlflow_journal/` when the output is object storage):
  <id>.json   which run: its id, or how to create it when the store was down as the run began
  <id>.jsonl  the calls, one JSON line each, in the order they were made
  <id>.sent   the byte offset of the first call not yet accepted by the store
  <id>/       the images, tables and files the calls name (copied: the originals may change)
A journal is removed once all of it has been sent. Exactly once: the offset advances right after the store
accepts a call, so only a process killed between the two can send a call twice. A call the store refuses
(a 4xx answer, e.g. a param changed on resume) is not retried: it goes to `<id>.rejected.jsonl`, with a warning.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import pickle
import shutil
import sys
import threading
import time
import uuid

from training.tracking.probe import unreachable

JOURNAL_DIR = "mlflow_journal"
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


def journal_dir(output: str) -> str:
    local = "://" not in output or output.startswith("file://")
    return os.path.join(output.removeprefix("file://") if local else ".", JOURNAL_DIR)


def _env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _write_atomic(path: str, text: str) -> None:
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


class Journal:
    """One run's calls on disk, locked by the process that sends them."""

    def __init__(self, folder: str, ident: str):
        self.folder, self.ident = folder, ident
        self.base = os.path.join(folder, ident)
        self.lock = threading.Lock()  # appends (callers) against the offset's reset (sender)
        self._handle = None
        self._spec: dict | None = None  # read once: the sender asks for the run on every send

    @classmethod
    def create(cls, folder: str, spec: dict) -> Journal:
        os.makedirs(folder, exist_ok=True)
        journal = cls(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        journal.save_spec(spec)
        open(journal.base + ".jsonl", "a").close()
        if not journal.claim():
            raise RuntimeError(f"journal {journal.base} is held by another process")
        return journal

    def claim(self) -> bool:
        """Hold the journal for this process (a flock, so a killed holder's journals are free again)."""
        handle = open(self.base + ".jsonl", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle:
            self._handle.close()
            self._handle = None

    def spec(self) -> dict:
        if self._spec is None:
            with open(self.base + ".json") as f:
                self._spec = json.load(f)
        return self._spec

    def save_spec(self, spec: dict) -> None:
        _write_atomic(self.base + ".json", json.dumps(spec))
        self._spec = spec

    def stage(self, name: str) -> str:
        """A fresh path under `<id>/` for a file a call names."""
        folder = os.path.join(self.base, uuid.uuid4().hex[:12])
        os.makedirs(folder)
        return os.path.join(folder, os.path.basename(name) or "file")

    def append(self, call: dict) -> None:
        with self.lock:
            self._handle.write(json.dumps(call, default=str) + "\n")
            self._handle.flush()

    def offset(self) -> int:
        try:
            with open(self.base + ".sent") as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def pending(self) -> list[tuple[int, dict]]:
        """The calls not yet sent, each with the offset just past it."""
        out, position = [], self.offset()
        with open(self.base + ".jsonl", "rb") as f:
            f.seek(position)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line being written, or cut by a kill: not a call yet
                position += len(line)
                out.append((position, json.loads(line)))
        return out

    def mark_sent(self, position: int) -> None:
        _write_atomic(self.base + ".sent", str(position))

    def reject(self, call: dict, reason: str) -> None:
        with open(self.base + ".rejected.jsonl", "a") as f:
            f.write(json.dumps({"call": call, "reason": reason}, default=str) + "\n")

    def compact(self) -> bool:
        """Empty the journal when everything in it was sent; True if it was."""
        with self.lock:
            if self.offset() < os.path.getsize(self.base + ".jsonl"):
                return False
            self._handle.truncate(0)
            self.mark_sent(0)
        return True

    def remove(self) -> None:
        for suffix in (".jsonl", ".sent", ".json"):
            if os.path.exists(self.base + suffix):
                os.remove(self.base + suffix)
        shutil.rmtree(self.base, ignore_errors=True)
        if self._handle:
            self._handle.close()
        try:
            os.rmdir(self.folder)  # the last journal of the folder: leave the output as it was
        except OSError:
            pass


class Sender:
    """Sends journals to the store in order; `send(journal)` returns how many calls are still waiting."""

    def __init__(self, uri: str):
        # Imported here, in the thread that starts the run, not first in the sending thread: a process that
        # forks (data loader workers) while another thread holds a module's import lock can hang its children.
        import mlflow.entities  # noqa: F401
        import PIL.Image  # noqa: F401
        import requests  # noqa: F401
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)  # opens the store (sqlite: its tables) here, too

    def run_id(self, journal: Journal) -> str:
        spec = journal.spec()
        if spec.get("run_id"):
            return spec["run_id"]
        experiment = self.client.get_experiment_by_name(spec["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(spec["experiment"])
        run = self.client.create_run(
            experiment_id, start_time=spec["start_time"], tags=spec["tags"], run_name=spec["run_name"]
        )
        journal.save_spec({**spec, "run_id": run.info.run_id})
        return run.info.run_id

    def send(self, journal: Journal) -> None:
        """Send every call waiting in `journal`; raises what the store raised when it stops answering."""
        run_id = self.run_id(journal)
        pending = journal.pending()
        i = alone_until = 0
        while i < len(pending):
            start = i
            calls, i = ([pending[i][1]], i + 1) if i < alone_until else self._group(pending, i)
            try:
                self._call(run_id, calls)
            except Exception as err:
                if not permanent(err):
                    raise
                if len(calls) > 1:  # which call was refused: the group's calls again, one at a time
                    i, alone_until = start, i
                    continue
                reason = str(err).splitlines()[0]
                journal.reject(calls[0], reason[:500])
                print(
                    f"warning: MLflow refused {calls[0]['op']} for run {run_id}: {reason[:200]}"
                    f" (kept in {journal.base}.rejected.jsonl)",
                    file=sys.stderr,
                )
            journal.mark_sent(pending[i - 1][0])
            for call in calls:  # a staged file is needed no more once its call is in
                if "path" in call:
                    shutil.rmtree(os.path.dirname(call["path"]), ignore_errors=True)

    @staticmethod
    def _group(pending: list, i: int) -> tuple[list[dict], int]:
        """Consecutive metric/param/tag calls fit in one log_batch; anything else goes alone."""
        calls = [pending[i][1]]
        i += 1
        if calls[0]["op"] != "batch":
            return calls, i
        sizes = {kind: len(calls[0].get(kind, ())) for kind in BATCH_LIMITS}
        params = {k for k, _ in calls[0].get("params", ())}
        while i < len(pending) and pending[i][1]["op"] == "batch":
            after = {kind: sizes[kind] + len(pending[i][1].get(kind, ())) for kind in BATCH_LIMITS}
            if any(after[k] > BATCH_LIMITS[k] for k in BATCH_LIMITS) or sum(after.values()) > 1000:
                break
            keys = {k for k, _ in pending[i][1].get("params", ())}
            if keys & params:  # a param logged again goes on its own: the store decides (same value, or refused)
                break
            calls.append(pending[i][1])
            sizes, params, i = after, params | keys, i + 1
        return calls, i

    def _call(self, run_id: str, calls: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        call, client = calls[0], self.client
        op = call["op"]
        if op == "batch":
            metrics = [Metric(k, float(v), int(t), int(s)) for c in calls for k, v, t, s in c.get("metrics", ())]
            params = {k: v for c in calls for k, v in c.get("params", ())}  # no key twice (_group)
            tags = {k: v for c in calls for k, v in c.get("tags", ())}
            client.log_batch(
                run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
        elif op == "dict":
            client.log_dict(run_id, call["data"], call["file"])
        elif op == "text":
            client.log_text(run_id, call["text"], call["file"])
        elif op == "image":
            from PIL import Image

            with Image.open(call["path"]) as image:
                image.load()
                client.log_image(
                    run_id,
                    image,
                    artifact_file=call["file"],
                    key=call["key"],
                    step=call["step"],
                    timestamp=call["timestamp"],
                )
        elif op == "table":
            with open(call["path"], "rb") as f:
                client.log_table(run_id, pickle.load(f), call["file"])
        elif op == "artifact":
            if os.path.isdir(call["path"]):
                client.log_artifacts(run_id, call["path"], call["dir"])
            else:
                client.log_artifact(run_id, call["path"], call["dir"])
        elif op == "end":
            client.set_terminated(run_id, call["status"], end_time=call["end_time"])
        else:
            raise ValueError(f"unknown journal call {op!r}")


def permanent(err: Exception) -> bool:
    """A refusal that retrying cannot fix (a 4xx answer, a call the journal cannot rebuild), as opposed to a
    store that does not answer (connection refused, time-outs, 5xx) — those are retried."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return 400 <= err.get_http_status_code() < 500
    # Network errors (requests', sockets') are OSErrors; a staged file gone, or a bug, is not retried.
    return not isinstance(err, OSError) or isinstance(err, FileNotFoundError)


def leftover_journals(folder: str) -> list[Journal]:
    """Journals in `folder` that no live process holds (a killed run, a run that ended offline), oldest first."""
    found = []
    for spec in sorted(glob.glob(os.path.join(folder, "*.json")), key=os.path.getmtime):
        journal = Journal(folder, os.path.basename(spec)[: -len(".json")])
        if os.path.exists(journal.base + ".jsonl") and journal.claim():
            found.append(journal)
    return found


def sync(output: str) -> tuple[int, int]:
    """Send what runs logged from `output` while the store was away; returns (journals, calls) sent. The
    store is the one each journal names (the run's own), unless MLFLOW_TRACKING_URI is set."""
    if not os.path.isdir(output):
        raise FileNotFoundError(f"{output}: no such folder")
    folder = output if os.path.basename(output.rstrip("/")) == JOURNAL_DIR else journal_dir(output)
    journals = calls = 0
    for journal in leftover_journals(folder):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or journal.spec()["uri"]
        reason = unreachable(uri)
        if reason:
            raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({reason})")
        calls += len(journal.pending())
        Sender(uri).send(journal)
        journal.remove()
        journals += 1
    return journals, calls
