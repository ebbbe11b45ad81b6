"""`TrainingShardWriter`: the shard stage's per-worker class. Each call writes whole output tars, reading
each sample's members from the raw tars by byte range (the index holds their offsets), in shuffled order."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from pipeline.storage import Location
from pipeline.tar_io import TarSampleWriter

PLAN_DIR = "_plan"


def output_name(index: int) -> str:
    return f"{index:05d}.tar"


def done_name(index: int) -> str:
    return f"{PLAN_DIR}/done/{index:05d}.json"


class TrainingShardWriter:
    def __init__(self, raw_url: str, output_url: str):
        self.raw = Location(raw_url)
        self.output = Location(output_url)
        plan = pq.read_table(self.output.path(f"{PLAN_DIR}/members.parquet")).to_pydict()
        # key → its members, in the order they were in the raw tar: [(raw shard, extension, offset, size)]
        self.members: dict[str, list] = {}
        for key, shard, ext, offset, size in zip(plan["key"], plan["shard"], plan["ext"], plan["offset"], plan["size"]):
            self.members.setdefault(key, []).append((shard, ext, offset, size))
        self.assignment = pq.read_table(self.output.path(f"{PLAN_DIR}/assignment.parquet"))

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(self.write(int(i))) for i in batch["index"]]
        return {"index": np.asarray(batch["index"]), "result": np.asarray(results)}

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
        writer = TarSampleWriter(self.output, output_name(index))
        try:
            for key in keys:
                writer.add(data[key])
        except BaseException:
            writer.abort()
            raise
        result = {"index": index, "samples": len(keys), "sha256": writer.close()}
        self.output.write_json(done_name(index), result)  # after the tar: a done record means a whole tar
        return result
