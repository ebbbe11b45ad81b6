"""`shard(cfg)`: raw shards + selection → shuffled training tars of `samples_per_shard`, with `sizes.json`
(open_clip counts samples from it) and `manifest.json`, both last.

The plan (which key goes to which tar, in which order, and where its bytes are in the raw tars) is written
first; tars are then written in parallel, each recorded as done after its rename. A rerun after a kill
writes only the tars without a record, and the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.errors import StageError
from pipeline.ray_setup import actor_count, init_ray, quiet_ray_data
from pipeline.shard.writer import PLAN_DIR, TrainingShardWriter, done_name, output_name
from pipeline.storage import MANIFEST, Location, claim_output, config_fingerprint, write_manifest
from pipeline.tar_io import tar_index

RUN_ONLY = {"input", "selection", "output", "processes", "overwrite", "progress", "ray"}


def _selected(selection: Location) -> tuple[pa.Table, str]:
    if not selection.exists(MANIFEST):
        raise StageError(f"selection {selection.url} has no manifest.json: the filter has not finished there")
    table = pq.read_table(
        selection.path("selection.parquet"), columns=["key", "shard", "keep"], filesystem=selection.fs
    )
    kept = table.filter(table["keep"]).drop_columns(["keep"]).sort_by("key")
    return kept, selection.read_json(MANIFEST)["content_hash"]


def _index(raw: Location, shards: list[str]) -> pa.Table:
    """Where every member of the kept samples sits in its raw tar (headers only; no image is read)."""
    columns: dict[str, list] = {"key": [], "shard": [], "ext": [], "offset": [], "size": []}
    for shard in shards:
        with raw.fs.open(raw.path(shard), "rb") as f:
            for key, ext, offset, size in tar_index(f):
                columns["key"].append(key)
                columns["shard"].append(shard)
                columns["ext"].append(ext)
                columns["offset"].append(offset)
                columns["size"].append(size)
    return pa.table(columns)


def _plan(cfg: dict, out: Location, raw: Location, kept: pa.Table, identity: str) -> dict:
    existing = claim_output(out, f"{PLAN_DIR}/plan.json", identity, bool(cfg["overwrite"]), "a shard set")
    if existing:
        return existing
    plan_dir = Location(out.path(PLAN_DIR))
    plan_dir.makedirs("done")
    n, per = kept.num_rows, int(cfg["samples_per_shard"])
    order = np.random.default_rng(int(cfg["seed"])).permutation(n)  # position p holds kept row order[p]
    assignment = pa.table({"key": kept["key"].take(order), "out_shard": np.arange(n) // per, "position": np.arange(n)})
    index = _index(raw, sorted(set(kept["shard"].to_pylist())))
    members = index.filter(pc.is_in(index["key"], value_set=pa.array(kept["key"].to_pylist(), pa.string())))
    missing = n - len(set(members["key"].to_pylist()))
    if missing:
        raise StageError(
            f"{missing} selected samples are not in the raw shards of {raw.url}; was the selection made from them?"
        )
    out.write_parquet(f"{PLAN_DIR}/assignment.parquet", assignment)
    out.write_parquet(f"{PLAN_DIR}/members.parquet", members)
    record = {"identity": identity, "samples": n, "shards": (n + per - 1) // per}
    plan_dir.write_json("plan.json", record)  # last: a plan.json means the plan is whole
    return record


def _write_shards(cfg: dict, todo: list[int], samples: int) -> None:
    import ray

    init_ray(cfg["ray"]["num_cpus"])
    quiet_ray_data()
    dataset = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo)).map_batches(
        TrainingShardWriter,
        fn_constructor_kwargs={"raw_url": cfg["input"], "output_url": cfg["output"]},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actor_count(cfg["processes"], len(todo))),
        num_cpus=1,
    )
    with tqdm(total=samples, desc="shard", unit="sample", disable=not cfg["progress"], smoothing=0) as bar:
        for row in dataset.iter_rows():
            bar.update(json.loads(row["result"])["samples"])


def shard(cfg: DictConfig | dict) -> dict:
    """Run the shard stage; returns its manifest."""
    started = time.time()
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    for key in ("input", "selection", "output"):
        if "://" not in str(cfg[key]):  # Ray workers may run in another directory than this driver
            cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
    if int(cfg["samples_per_shard"]) < 1:
        raise StageError(f"samples_per_shard={cfg['samples_per_shard']}; expected a positive integer")
    raw, out = Location(cfg["input"]), Location(cfg["output"])
    kept, selection_hash = _selected(Location(cfg["selection"]))
    raw_hash = raw.read_json(MANIFEST)["content_hash"] if raw.exists(MANIFEST) else None
    identity = config_fingerprint(
        {"config": {k: v for k, v in cfg.items() if k not in RUN_ONLY}, "selection": selection_hash, "raw": raw_hash}
    )
    out.makedirs()
    if out.exists(MANIFEST) and out.read_json(MANIFEST).get("identity") == identity:
        manifest = out.read_json(MANIFEST)
        print(f"shard: {out.url} is already complete ({manifest['counts']['samples']} samples); nothing to do")
        return manifest
    record = _plan(cfg, out, raw, kept, identity)
    out.remove_temporaries()
    out.remove(MANIFEST)
    todo = [i for i in range(record["shards"]) if not out.exists(done_name(i))]
    per = int(cfg["samples_per_shard"])
    if todo:
        _write_shards(cfg, todo, sum(min(per, record["samples"] - i * per) for i in todo))
    done = [out.read_json(done_name(i)) for i in range(record["shards"])]
    sizes = {output_name(d["index"]): d["samples"] for d in done}
    if sum(sizes.values()) != record["samples"]:
        raise RuntimeError(f"shards in {out.url} hold {sum(sizes.values())} samples; the plan has {record['samples']}")
    out.write_json("sizes.json", sizes)
    counts = {"samples": record["samples"], "shards": record["shards"], "samples_per_shard": per}
    manifest = write_manifest(
        out,
        "shard",
        cfg,
        counts,
        {output_name(d["index"]): d["sha256"] for d in done},
        started,
        identity=identity,
        selection_content_hash=selection_hash,
        raw_content_hash=raw_hash,
    )
    out.remove(PLAN_DIR)  # after the manifest: a rerun finds the manifest and does nothing
    print(f"shard summary: {record['samples']} samples in {record['shards']} tars of up to {per} → {out.url}")
    return manifest
