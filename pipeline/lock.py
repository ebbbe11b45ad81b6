"""One writer per output folder, for every stage: `with output_lock(location, stage, wait):`.

The lock is `{output}/_lock.json`, created exclusively before anything else in the folder is touched. It
records who holds it (host, pid, the process's start, the stage, when it was taken) and a heartbeat that the
holder refreshes while it runs. A second run stops at once with a one-line error naming the holder, or, with
`wait_for_lock=true`, waits for the holder to finish. A lock whose holder is gone is taken over: on the same
host when the process no longer exists (or its pid now belongs to another process), from another host when
its heartbeat is older than `STALE_AFTER_S`.

Exclusive creation is `O_CREAT | O_EXCL` on a local or network filesystem. On object stores (fsspec URLs)
it is a create-if-absent followed by a read-back of our token: stores without conditional writes give a
best-effort exclusion there (two runs starting within the same second may both believe they hold it).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from pipeline.errors import DiskFullError, StageError
from pipeline.storage import LOCK, Location

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a holder on another host that has not refreshed its heartbeat for this long is gone
POLL_S = 0.5


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict) -> bool:
    """Whether the holder recorded in `record` may still be running."""
    if "filling" in record:
        return record["filling"]
    if record.get("host") != socket.gethostname():
        return time.time() - float(record.get("heartbeat", 0)) < STALE_AFTER_S
    pid = int(record.get("pid", 0))
    if pid <= 0:  # never signal 0 or -1: those mean "my process group" and "every process"
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started = record.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def describe(record: dict) -> str:
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("taken_at", 0))))
    return f"{record.get('stage', '?')} (pid {record.get('pid')} on {record.get('host')}, since {taken})"


class OutputLock:
    def __init__(self, out: Location, stage: str):
        self.out = out
        self.path = out.path(LOCK)
        self.local = type(out.fs).__name__ == "LocalFileSystem"
        self.record = {
            "stage": stage,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "taken_at": time.time(),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------------
    def acquire(self, wait: bool) -> None:
        announced = False
        while True:
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="output-lock", daemon=True)
                self._beat.start()
                return
            holder = self._read()
            if holder is None:
                continue  # given back between our attempt and our read
            if not _alive(holder):
                self._break(holder)
                continue
            if not wait:
                raise StageError(
                    f"output {self.out.url} is being written by {describe(holder)}; wait for it to end, "
                    f"or pass wait_for_lock=true"
                )
            if not announced:
                print(f"waiting for {describe(holder)} to finish with {self.out.url}", flush=True)
                announced = True
            time.sleep(POLL_S)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self.record["token"]:
            self.out.remove(LOCK)

    # -- the file --------------------------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps({**self.record, "heartbeat": time.time()}, indent=2, sort_keys=True).encode()

    def _create(self) -> bool:
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if self.out.fs.exists(self.path):
            return False
        try:
            with self.out.fs.open(self.path, "wb") as f:
                f.write(self._payload())
        except FileExistsError:
            return False
        time.sleep(0.2)  # let a racing writer's object land, then see whose token the store kept
        holder = self._read()
        return holder is not None and holder.get("token") == self.record["token"]

    def _read(self) -> dict | None:
        try:
            with self.out.fs.open(self.path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            # Empty or half-written: its writer was killed between creating and filling it, or is filling it
            # right now. Give it a few seconds before calling it dead.
            age = time.time() - os.path.getmtime(self.path) if self.local else STALE_AFTER_S
            return {"stage": "an unknown run", "host": "?", "pid": 0, "filling": age < 5}

    def _break(self, holder: dict) -> None:
        """Remove a dead holder's lock; when two runs race to break it, only one rename succeeds."""
        if self.local:
            stale = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                return
            os.remove(stale)
        else:
            self.out.remove(LOCK)
        print(f"took over {self.out.url} from {describe(holder)}, which is no longer running", flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is None or holder.get("token") != self.record["token"]:
                return  # taken over (we looked dead): the new holder owns the file now
            try:
                with self.out.open_atomic(LOCK) as f:
                    f.write(self._payload())
            except DiskFullError:
                continue  # the last heartbeat stays in place; the run's own write reports the full disk


@contextmanager
def output_lock(out: Location, stage: str, wait: bool = False):
    """Hold `out` for the duration of the block; see the module's docstring."""
    out.makedirs()
    lock = OutputLock(out, stage)
    lock.acquire(wait)
    try:
        yield lock
    finally:
        lock.release()
