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
        plan = pq.read_table(self.output.path(f"{WORK}/members.parquet"), filesystem=self.output.fs).to_pydict()
        # key → its members, in the order they were in the raw tar: [(raw shard, extension, offset, size)]
        self.members: dict[str, list] = {}
        for key, shard, ext, offset, size in zip(plan["key"], plan["shard"], plan["ext"], plan["offset"], plan["size"]):
            self.members.setdefault(key, []).append((shard, ext, offset, size))
        self.assignment = pq.read_table(self.output.path(f"{WORK}/assignment.parquet"), filesystem=self.output.fs)

    def __call__(self, unit: str) -> dict:
        """`unit`: the output tar's index as a name ("00003"); returns its done record."""
        return self.write(int(unit))

    def write(self, index: int) -> dict:
        keys = self.assignment.filter(self.assignment["out_shard"].to_numpy() == index).column("key").to_pylist()
        # Read in raw-tar order (one open file per raw tar, forward seeks), write in shuffled order.
        wanted = sorted((m[0], m[2], key, m[1], m[3]) for key in keys for m in self.members[key])
        data: dict[str, dict] = {key: {"__key__": key} for key in keys}
        handle, current = None, None
        try:
            for shard, offset, key, ext, size in wanted:
                if shard != current:
                    if handle:
                        handle.close()
                    handle, current = self.raw.fs.open(self.raw.path(shard), "rb"), shard
                handle.seek(offset)
                data[key][ext] = handle.read(size)
        finally:
            if handle:
                handle.close()
        # Its exact size, so that a full disk's message says how much this tar needs.
        writer = TarSampleWriter(self.output, output_name(index), size=tar_size([data[k] for k in keys]))
        try:
            for key in keys:
                writer.add(data[key])
        except BaseException:
            writer.abort()
            raise
        return {"index": index, "samples": len(keys), "sha256": writer.close()}
