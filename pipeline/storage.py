"""Where stages read and write: local paths or fsspec URLs, written atomically, with a manifest written last.

The contract every stage keeps (DESIGN.md): nothing half-written is visible under its final name, and a
`manifest.json` with counts, the resolved config, the code version and a content hash marks a finished output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from importlib import metadata

import fsspec

from pipeline.errors import StageError, disk_full, is_disk_full

MANIFEST = "manifest.json"
LOCK = "_lock.json"  # held by `pipeline.lock.output_lock` while a run writes the folder


class Location:
    """A folder on any fsspec filesystem."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str = "") -> bool:
        self.fs.invalidate_cache()  # object stores cache listings; other processes (Ray workers) write here
        return self.fs.exists(self.path(name) if name else self.root)

    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def listdir(self, name: str = "") -> list[str]:
        folder = self.path(name) if name else self.root
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False))

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    def url_of(self, name: str) -> str:
        """`name` as the user wrote the location (what messages show)."""
        return f"{self.url}/{name}"

    @contextmanager
    def open_atomic(self, name: str, mode: str = "wb", size: int | None = None):
        """Write under a temporary name, then rename: readers see the old file or the whole new one. A full
        disk removes the partial file and raises a DiskFullError naming `name`, the bytes it needs (`size`
        when the caller knows it, else at least what had landed) and the space left."""
        tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(self.path(tmp), mode) as f:
                yield f
            self.fs.mv(self.path(tmp), self.path(name))
        except OSError as err:
            if not is_disk_full(err):
                raise
            landed = self._size(tmp)
            self._discard(tmp)  # before measuring: the space it held is free again
            needed = max(size or 0, landed)
            raise disk_full(self.url_of(name), err, needed, at_least=size is None) from err
        finally:
            self._discard(tmp)

    def _size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.path(name)) or 0)
        except (OSError, ValueError):
            return 0

    def _discard(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name))

    def write_parquet(self, name: str, table, **options) -> str:
        """Write a pyarrow table atomically (`options` go to `pq.write_table`, e.g. `row_group_size`); returns
        the file's sha256 (taken from the buffer, not re-read)."""
        import io

        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        with self.open_atomic(name, size=buffer.tell()) as f:
            f.write(buffer.getvalue())
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def read_json(self, name: str):
        with self.fs.open(self.path(name), "r") as f:
            return json.load(f)

    def write_json(self, name: str, obj) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        with self.open_atomic(name, "w", size=len(text.encode())) as f:
            f.write(text)

    def remove_temporaries(self) -> int:
        """Leftovers of writers that were killed, at any depth: they were never visible under a final name.
        Call it only while holding the folder's lock (`pipeline.lock`), or a live writer's files would go."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return 0
        stale = [p for p in self.fs.find(self.root) if ".tmp-" in p.rsplit("/", 1)[-1]]
        for path in stale:
            if self.fs.exists(path):
                self.fs.rm(path)
        return len(stale)


def claim_output(out: Location, marker: str, identity: str, overwrite: bool, what: str) -> dict | None:
    """Make `out` the output of the run named by `identity`. Returns the `marker` record when `out` holds an
    interrupted run of the same identity (resume from it); otherwise empties `out` and returns None. Another
    run's output, or a folder that is no stage's output, is emptied only with `overwrite`. A folder holding
    only a run's beginnings (a `_work/` folder without `marker`: killed while planning) is started afresh.
    The lock file (`pipeline.lock`) is never counted or removed here."""
    work = marker.split("/", 1)[0]
    entries = [n for n in out.listdir() if n != LOCK and ".tmp-" not in n]
    if out.exists(marker):
        record = out.read_json(marker)
        if record["identity"] == identity:
            return record
        if not overwrite:
            raise StageError(
                f"output {out.url} holds {what} of another input or config; "
                "choose another output or pass overwrite=true"
            )
    elif entries and entries != [work] and not overwrite:
        raise StageError(
            f"output {out.url} is not empty and holds no {what}; choose an empty folder or pass overwrite=true"
        )
    for name in out.listdir():
        if name != LOCK:
            out.remove(name)
    return None


def code_version() -> str:
    """The package version, and the git commit when running from a checkout."""
    version = metadata.version("pixelmill")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def config_fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(file_hashes: dict[str, str]) -> str:
    """One hash over the output files' sha256, in name order: equal hashes, equal outputs."""
    digest = hashlib.sha256()
    for name in sorted(file_hashes):
        digest.update(f"{name}:{file_hashes[name]}\n".encode())
    return digest.hexdigest()


def write_manifest(
    location: Location, stage: str, config: dict, counts: dict, file_hashes: dict[str, str], started: float, **extra
) -> dict:
    """`file_hashes`: output file name → sha256, taken while writing so that nothing is read twice."""
    manifest = {
        "stage": stage,
        "config": config,
        "config_fingerprint": config_fingerprint(config),
        "code_version": code_version(),
        "counts": counts,
        "outputs": sorted(file_hashes),
        "content_hash": content_hash(file_hashes),
        "duration_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    location.write_json(MANIFEST, manifest)
    return manifest


def file_sha256(location: Location, name: str) -> str:
    digest = hashlib.sha256()
    with location.fs.open(location.path(name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
