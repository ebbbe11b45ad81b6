"""`TrainingShardWriter`: the shard stage's per-worker class. Each call writes whole output tars, reading
each sample's members from the raw tars by byte range (the index holds their offsets), in shuffled order.
The stage driver records a tar as done after its call returns, so after the tar's rename."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.stage import WORK
from pipeline.storage import Location
from pipeline.tar_io import TarSampleWriter, tar_size


def output_name(index: int) -> str:
    return f"{index:05d}.tar"


class TrainingShardWriter:
    def __init__(self, raw_url: str, output_url: str):
        self.raw = Location(raw_url)
        self.output = Location(output_url)
        self.plan = self.output.path(f"{WORK}/members.parquet")

    def __call__(self, unit: str) -> dict:
        """`unit`: the output tar's index as a name ("00003"); returns its done record."""
        return self.write(int(unit))

    def write(self, index: int) -> dict:
        # Only this tar's rows: the plan is sorted by out_shard, so the filter reads a row group or two.
        rows = pq.read_table(
            self.plan, filters=[("out_shard", "=", index)], filesystem=self.output.fs,
            columns=["key", "shard", "ext", "offset", "size", "position"],
        ).to_pylist()  # fmt: skip
        # Rows come in raw-tar order (one open file per raw tar, forward seeks); written in shuffled order.
        data: dict[str, dict] = {}
        position: dict[str, int] = {}
        handle, current = None, None
        try:
            for row in rows:
                if row["shard"] != current:
                    if handle:
                        handle.close()
                    handle, current = self.raw.fs.open(self.raw.path(row["shard"]), "rb"), row["shard"]
                handle.seek(row["offset"])
                data.setdefault(row["key"], {"__key__": row["key"]})[row["ext"]] = handle.read(row["size"])
                position[row["key"]] = row["position"]
        finally:
            if handle:
                handle.close()
        keys = sorted(data, key=position.__getitem__)
        # Its exact size, so that a full disk's message says how much this tar needs.
        writer = TarSampleWriter(self.output, output_name(index), size=tar_size([data[k] for k in keys]))
        try:
            for key in keys:
                writer.add(data[key])
        except BaseException:
            writer.abort()
            raise
        return {"index": index, "samples": len(keys), "sha256": writer.close()}
