"""One crawl shard on disk, in img2dataset's webdataset layout.

`{shard:05d}.tar` holds `{key}.jpg|txt|json` for every success, in key order whatever order downloads finish in
(the same outcomes give the same bytes); `{shard:05d}.parquet` holds a row for *every* input row of the shard
(success or not), in key order; `{shard:05d}_stats.json` is written last, and the stage driver's done
record (`_work/done/{shard:05d}.json`, the same stats) after it. All three are written under temporary names
and renamed, the stats file last.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from pipeline.storage import Location
from pipeline.tar_io import OrderedSampleWriter, TarSampleWriter

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
    """Streams samples into a temporary tar in key order as they finish (memory stays flat), then commits the
    shard. Every row's position in the shard (its place in key order) is `put` once: with its sample, or
    with `skip` when it has none."""

    def __init__(self, location: Location, shard_id: int, schema: pa.Schema, extension: str, rows: int | None = None):
        """`rows`: the shard's input rows, at most its samples (a full disk's message extrapolates from it)."""
        self.location = location
        self.shard_id = shard_id
        self.schema = schema
        self.extension = extension
        self.tar_name, self.parquet_name, self.stats_name = shard_files(shard_id)
        self._tar = OrderedSampleWriter(TarSampleWriter(location, self.tar_name, samples=rows))

    def add(self, position: int, record: dict, image: bytes) -> None:
        meta = {k: json_safe(v) for k, v in record.items()}
        self.add_raw(
            position,
            {
                "__key__": record["key"],
                self.extension: image,
                "txt": (record["caption"] or "").encode("utf-8"),
                "json": json.dumps(meta).encode("utf-8"),
            },
        )

    def add_raw(self, position: int, sample: dict) -> None:
        """A sample in tar form (see `pipeline.tar_io`), as webdataset and img2dataset lay them out."""
        self._tar.put(position, sample)

    def skip(self, position: int) -> None:
        self._tar.put(position, None)

    def commit(self, records: list[dict], stats: dict) -> None:
        """Tar, then parquet, then stats: a shard with a stats file is complete. The stats carry both files'
        sha256, taken as they were written, so the manifest's content hash never reads a shard again."""
        tar_sha256 = self._tar.close()
        records = sorted(records, key=lambda r: r["key"])
        table = pa.Table.from_pylist(records, schema=self.schema)
        parquet_sha256 = self.location.write_parquet(self.parquet_name, table)
        stats["sha256"] = {self.tar_name: tar_sha256, self.parquet_name: parquet_sha256}
        self.location.write_json(self.stats_name, stats)

    def abort(self) -> None:
        self._tar.abort()


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
