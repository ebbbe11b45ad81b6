"""`TrackedRun`: the one place every command logs to MLflow through (training's Lightning logger, the pipeline,
the filter's report, evaluation). Calls are journaled and sent by a background thread (journal.py), so a
tracking server that goes away never stalls or ends a run: it only delays what the server shows."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import threading
import time

from training.tracking.journal import Journal, Sender, journal_dir, leftover_journals, permanent
from training.tracking.probe import unreachable

RETRY_ENV, CLOSE_ENV = "PIXELMILL_TRACKING_RETRY_S", "PIXELMILL_TRACKING_CLOSE_S"
PARAM_CHUNK = 100  # params per journal line: MLflow takes at most 100 per batch


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrackedRun:
    """One MLflow run: log calls return at once; `close()` ends the run (sent when the server answers)."""

    def __init__(self, journal: Journal, sender: Sender, run_id: str | None, output: str):
        self.journal, self.sender, self.run_id, self.output = journal, sender, run_id, output
        self.uri, self.name = sender.uri, journal.spec()["run_name"]
        self.offline_reason: str | None = None
        self._wake, self._stopping = threading.Event(), threading.Event()
        # What earlier runs in this folder left for the same store (a killed run of this training, say).
        self._leftovers = []
        for leftover in leftover_journals(journal.folder):
            if leftover.spec().get("uri") == self.uri:
                self._leftovers.append(leftover)
            else:
                leftover.release()  # another store's: left for `sync`
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-journal", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls, name: str, output: str, experiment: str, tags: dict | None = None, run_id: str | None = None, uri=None
    ) -> TrackedRun:
        """A new run (or, with `run_id`, more logging into an existing one). The run is created here when the
        server answers, so that its id is known at once; otherwise when the server answers again."""
        import mlflow
        from mlflow.tracking.context.registry import resolve_tags

        from training.tracking import tracking_uri

        uri = uri or tracking_uri()
        mlflow.set_tracking_uri(uri)  # as `mlflow.start_run` would: code after the command reads the same store
        spec = {"uri": uri, "experiment": experiment, "run_name": name, "start_time": _now_ms(), "run_id": run_id}
        spec["tags"] = {} if run_id else {k: str(v) for k, v in resolve_tags(tags or {}).items()}
        journal = Journal.create(journal_dir(output), spec)
        sender = Sender(uri)
        if run_id is None and unreachable(uri) is None:
            try:
                run_id = sender.run_id(journal)
            except Exception as err:
                if permanent(err):
                    journal.remove()
                    raise
        return cls(journal, sender, run_id, output)

    # What callers log. Each call is one journal line; files are copied beside it.
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        stamp, step = _now_ms(), int(step or 0)
        self._add({"op": "batch", "metrics": [[k, float(v), stamp, step] for k, v in metrics.items()]})

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: dict) -> None:
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for i in range(0, len(items), PARAM_CHUNK):
            self._add({"op": "batch", "params": items[i : i + PARAM_CHUNK]})

    def set_tags(self, tags: dict) -> None:
        self._add({"op": "batch", "tags": [[k, str(v)] for k, v in tags.items()]})

    def set_tag(self, key: str, value) -> None:
        self.set_tags({key: value})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._add({"op": "dict", "data": data, "file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._add({"op": "text", "text": text, "file": artifact_file})

    def log_image(self, image, artifact_file: str | None = None, key: str | None = None, step: int | None = None):
        """A PIL image, an HxW(xC) uint8 array or PNG bytes: at `artifact_file`, or as step `step` of the image
        series `key`."""
        from PIL import Image

        path = self.journal.stage("image.png")
        if isinstance(image, bytes):
            with open(path, "wb") as f:
                f.write(image)
        else:
            (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
        call = {"op": "image", "path": path, "file": artifact_file, "key": key, "step": step, "timestamp": None}
        if key is not None:
            call.update(step=int(step or 0), timestamp=_now_ms())
        self._add(call)

    def log_figure(self, figure, artifact_file: str) -> None:
        path = self.journal.stage(artifact_file)
        figure.savefig(path)
        self._add({"op": "artifact", "path": path, "dir": os.path.dirname(artifact_file) or None})

    def log_table(self, data: dict, artifact_file: str) -> None:
        path = self.journal.stage("table.pkl")  # pickled: tables may hold images
        with open(path, "wb") as f:
            pickle.dump(data, f)
        self._add({"op": "table", "path": path, "file": artifact_file})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        path = self.journal.stage(os.path.basename(local_path.rstrip("/")))
        (shutil.copytree if os.path.isdir(local_path) else shutil.copy2)(local_path, path)
        self._add({"op": "artifact", "path": path, "dir": artifact_path})

    def _add(self, call: dict) -> None:
        self.journal.append(call)
        self._wake.set()

    def waiting(self) -> int:
        return len(self.journal.pending()) + sum(len(j.pending()) for j in self._leftovers)

    def close(self, status: str = "FINISHED") -> None:
        """End the run. Waits while the server takes calls; when it does not answer, leaves them in the journal
        with one line saying how to send them later."""
        self._add({"op": "end", "status": status, "end_time": _now_ms()})
        self._stopping.set()
        self._wake.set()
        patience, last = _seconds(CLOSE_ENV, 30), self.journal.offset()
        deadline = time.monotonic() + patience
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.5)
            if (offset := self.journal.offset()) != last:  # still sending: keep waiting
                last, deadline = offset, time.monotonic() + patience
        left = self.waiting()
        if left == 0 and not self._thread.is_alive():
            self.journal.remove()
            return
        reason = self.offline_reason or "still sending"
        print(
            f"MLflow: {left} call(s) of run '{self.name}' wait in {self.journal.folder} ({self.uri}: {reason}); "
            f"send them with: python -m training.tracking sync {self.output}",
            file=sys.stderr,
        )

    def _send_loop(self) -> None:
        retry = _seconds(RETRY_ENV, 30)
        while True:
            self._wake.clear()
            stopping = self._stopping.is_set()
            if self.offline_reason is None or unreachable(self.uri) is None:
                self._send_all()
            if stopping:
                return
            self._wake.wait(retry if self.offline_reason else None)

    def _send_all(self) -> None:
        try:
            for journal in list(self._leftovers):
                self.sender.send(journal)
                journal.remove()
                self._leftovers.remove(journal)
            self.sender.send(self.journal)
            self.run_id = self.run_id or self.journal.spec()["run_id"]
            if self.offline_reason:
                print(f"MLflow: {self.uri} answers again; run '{self.name}' is up to date", file=sys.stderr)
            self.offline_reason = None
            self.journal.compact()
        except Exception as err:  # noqa: BLE001 — whatever the store raised, the run goes on
            reason = unreachable(self.uri) or (str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            if self.offline_reason is None:
                print(
                    f"warning: MLflow at {self.uri} is not answering ({reason}); the run goes on, logging to "
                    f"{self.journal.folder}, replayed when the server answers again (checked every "
                    f"{_seconds(RETRY_ENV, 30):g} s)",
                    file=sys.stderr,
                )
            self.offline_reason = reason
