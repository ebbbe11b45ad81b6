"""One crawl shard on disk, in img2dataset's webdataset layout.

`{shard:05d}.tar` holds `{key}.jpg|txt|json` for every success; `{shard:05d}.parquet` holds a row for *every*
input row of the shard (success or not); `{shard:05d}_stats.json` is written last and marks the shard done.
All three are written under temporary names and renamed, the stats file last.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Location

# Columns every crawl parquet has, in img2dataset's names and types; input extras follow them.
BASE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)
STATUSES = ("success", "failed_to_download", "failed_to_resize", "duplicate")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def shard_files(shard_id: int) -> tuple[str, str, str]:
    name = shard_name(shard_id)
    return f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"


def is_complete(location: Location, shard_id: int) -> bool:
    return all(location.exists(f) for f in shard_files(shard_id))


def output_schema(extra_fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(list(BASE_SCHEMA) + list(extra_fields))


def json_safe(value):
    """Parquet values as JSON: numpy scalars and arrays, timestamps, bytes."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return str(value)


class ShardWriter:
    """Streams samples into a temporary tar as they finish (memory stays flat), then commits the shard."""

    def __init__(self, location: Location, shard_id: int, schema: pa.Schema, extension: str):
        self.location = location
        self.shard_id = shard_id
        self.schema = schema
        self.extension = extension
        self.tar_name, self.parquet_name, self.stats_name = shard_files(shard_id)
        self._tar_cm = location.open_atomic(self.tar_name)
        self._tar_file = HashingWriter(self._tar_cm.__enter__())
        # Plain tarfile, not webdataset.TarWriter: that import pulls in torch, a second and ~300 MB per worker.
        self._tar = tarfile.open(fileobj=self._tar_file, mode="w|", format=tarfile.USTAR_FORMAT)

    def add(self, record: dict, image: bytes) -> None:
        meta = {k: json_safe(v) for k, v in record.items()}
        self.add_raw(
            {
                "__key__": record["key"],
                self.extension: image,
                "txt": (record["caption"] or "").encode("utf-8"),
                "json": json.dumps(meta).encode("utf-8"),
            }
        )

    def add_raw(self, sample: dict) -> None:
        """A sample in tar form: `{"__key__": key, ext: bytes, ...}`, one member per extension, as webdataset
        and img2dataset lay them out. Fixed mtime and owner: the same samples give the same bytes."""
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext == "__key__":
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))

    def commit(self, records: list[dict], stats: dict) -> None:
        """Tar, then parquet, then stats: a shard with a stats file is complete. The stats carry both files'
        sha256, taken as they were written, so the manifest's content hash never reads a shard again."""
        self._tar.close()
        self._tar_cm.__exit__(None, None, None)
        records = sorted(records, key=lambda r: r["key"])
        table = pa.Table.from_pylist(records, schema=self.schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        with self.location.open_atomic(self.parquet_name) as f:
            f.write(buffer.getvalue())
        stats["sha256"] = {self.tar_name: self._tar_file.hexdigest(), self.parquet_name: hashlib.sha256(buffer.getvalue()).hexdigest()}
        self.location.write_json(self.stats_name, stats)

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._tar_cm.__exit__(RuntimeError, RuntimeError("aborted"), None)


class HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def shard_stats(records: list[dict], started: float, downloaded_bytes: int) -> dict:
    """img2dataset's stats fields, plus counts per reason and our duplicate status."""
    by_status = {s: 0 for s in STATUSES}
    reasons: dict[str, dict[str, int]] = {}
    messages: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] += 1
        if r["reason"]:
            of_status = reasons.setdefault(r["status"], {})
            of_status[r["reason"]] = of_status.get(r["reason"], 0) + 1
        message = r["error_message"] or r["status"]
        messages[message] = messages.get(message, 0) + 1
    ended = time.time()
    return {
        "count": len(records),
        "successes": by_status["success"],
        "failed_to_download": by_status["failed_to_download"],
        "failed_to_resize": by_status["failed_to_resize"],
        "duplicates": by_status["duplicate"],
        "reasons": {status: dict(sorted(r.items())) for status, r in sorted(reasons.items())},
        "status_dict": dict(sorted(messages.items(), key=lambda kv: -kv[1])[:100]),
        "bytes_downloaded": downloaded_bytes,
        "start_time": started,
        "end_time": ended,
        "duration": ended - started,
    }
