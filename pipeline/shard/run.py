"""`shard(cfg)`: raw shards + selection → shuffled training tars of `samples_per_shard`, with `sizes.json`
(open_clip counts samples from it) and `manifest.json`, both last.

The plan (which key goes to which tar, in which order, and where its bytes are in the raw tars) is written
first; tars are then written in parallel, each recorded as done after its rename (`pipeline.stage.drive`).
A rerun after a kill writes only the tars without a record, and the same seed gives the same bytes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import StageError
from pipeline.options import COUNT, RAY, STAGE_FLAGS, Option, check_options
from pipeline.shard.writer import TrainingShardWriter, output_name
from pipeline.stage import Finished, Run, Stage, drive
from pipeline.storage import MANIFEST, Location, config_fingerprint
from pipeline.tar_io import tar_index

RUN_ONLY = {"input", "selection", "output", "processes", "overwrite", "wait_for_lock", "progress", "ray"}
OPTIONS = (
    Option("samples_per_shard", **COUNT),
    Option("seed"),
    Option("processes", nullable=True, **COUNT),
    *STAGE_FLAGS,
    RAY,
)


def _selected(selection: Location) -> tuple[pa.Table, str]:
    if not selection.exists(MANIFEST):
        raise StageError(f"selection {selection.url} has no manifest.json: the filter has not finished there")
    table = pq.read_table(
        selection.path("selection.parquet"), columns=["key", "shard", "keep"], filesystem=selection.fs
    )
    kept = table.filter(table["keep"]).drop_columns(["keep"]).sort_by("key")
    return kept, selection.read_json(MANIFEST)["content_hash"]


INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("ext", pa.string()), ("offset", pa.int64()),
                          ("size", pa.int64())])  # fmt: skip
# Row groups of the members plan: a writer reads only the groups whose out_shard range holds its tar.
PLAN_ROW_GROUP = 65_536


def _index(raw: Location, shards: list[str]) -> pa.Table:
    """Where every member of the given raw tars sits (headers only; no image is read). One Arrow table per
    tar, so a 10M-sample set never becomes one Python list; typed even when empty (a selection that keeps
    nothing is a valid, empty shard set)."""
    tables = [pa.table({n: [] for n in INDEX_SCHEMA.names}, schema=INDEX_SCHEMA)]
    for shard in shards:
        with raw.fs.open(raw.path(shard), "rb") as f:
            rows = tar_index(f)
        key, ext, offset, size = zip(*rows) if rows else ((), (), (), ())
        tables.append(pa.table({"key": key, "shard": [shard] * len(key), "ext": ext, "offset": offset, "size": size},
                               schema=INDEX_SCHEMA))  # fmt: skip
    return pa.concat_tables(tables)


class ShardStage(Stage):
    """Units are output tars ("00003"); the plan under `_work/` says which key goes to which tar, in which
    order, and where its bytes are in the raw tars. `_work/` goes once the manifest is written."""

    name, what = "shard", "a shard set"

    def __init__(self, cfg: dict):
        self.started = time.time()
        for key in ("input", "selection", "output"):
            if "://" not in str(cfg[key]):  # Ray workers may run in another directory than this driver
                cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
        if int(cfg["samples_per_shard"]) < 1:
            raise StageError(f"samples_per_shard={cfg['samples_per_shard']}; expected a positive integer")
        self.cfg, self.raw, self.output = cfg, Location(cfg["input"]), Location(cfg["output"])
        self.kept, self.selection_hash = _selected(Location(cfg["selection"]))
        self.raw_hash = self.raw.read_json(MANIFEST)["content_hash"] if self.raw.exists(MANIFEST) else None
        self.identity = config_fingerprint(
            {
                "config": {k: v for k, v in cfg.items() if k not in RUN_ONLY},
                "selection": self.selection_hash,
                "raw": self.raw_hash,
            }
        )
        self.per = int(cfg["samples_per_shard"])

    def plan(self, work: Location) -> dict:
        kept, n, per = self.kept, self.kept.num_rows, self.per
        order = np.random.default_rng(int(self.cfg["seed"])).permutation(n)  # position p holds kept row order[p]
        assignment = pa.table(
            {"key": kept["key"].take(order), "out_shard": np.arange(n) // per, "position": np.arange(n)}
        )
        index = _index(self.raw, sorted(pc.unique(kept["shard"]).to_pylist()))
        # Each kept member with its output tar and position, sorted by tar and then by where its bytes are,
        # so that a writer reads one contiguous slice of the plan and its raw tars by forward seeks.
        members = index.join(assignment, "key", join_type="inner")
        missing = n - pc.count_distinct(members["key"]).as_py()
        if missing:
            raise StageError(
                f"{missing} selected samples are not in the raw shards of {self.raw.url}; "
                "was the selection made from them?"
            )
        members = members.sort_by([("out_shard", "ascending"), ("shard", "ascending"), ("offset", "ascending")])
        work.write_parquet("members.parquet", members, row_group_size=PLAN_ROW_GROUP)
        shards = (n + per - 1) // per
        return {"units": [f"{i:05d}" for i in range(shards)], "samples": n, "shards": shards}

    def worker(self, retry: bool) -> tuple[type, dict]:
        return TrainingShardWriter, {"raw_url": self.cfg["input"], "output_url": self.cfg["output"]}

    def bar(self, run: Run, units: list[str], retry: bool) -> dict:
        samples = sum(min(self.per, run.plan["samples"] - int(u) * self.per) for u in units)
        return {"total": samples, "desc": "shard", "unit": "sample"}

    def advance(self, bar, record: dict) -> None:
        bar.update(record["samples"])

    def finish(self, run: Run) -> Finished:
        done, samples, shards = list(run.done.values()), run.plan["samples"], run.plan["shards"]
        sizes = {output_name(d["index"]): d["samples"] for d in done}
        if sum(sizes.values()) != samples:
            held = sum(sizes.values())
            raise RuntimeError(f"shards in {self.output.url} hold {held} samples; the plan has {samples}")
        self.output.write_json("sizes.json", sizes)
        counts = {"samples": samples, "shards": shards, "samples_per_shard": self.per}
        extra = {"selection_content_hash": self.selection_hash, "raw_content_hash": self.raw_hash}
        summary = f"shard summary: {samples} samples in {shards} tars of up to {self.per} → {self.output.url}"
        return Finished(counts, {output_name(d["index"]): d["sha256"] for d in done}, extra, summary)


def shard(cfg: DictConfig | dict) -> dict:
    """Run the shard stage; returns its manifest."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_options("shard", cfg, OPTIONS)
    return drive(ShardStage(cfg))
