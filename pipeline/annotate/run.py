"""`annotate(cfg)`: raw shards → one metadata parquet per shard, streamed through Ray Data, manifest last.

Signals run as fused map tasks; CLIP scoring (when `clip` is set) as an actor pool. The driver gathers
each shard's rows and writes `{shard}.parquet` as soon as the shard is whole, then its done record (see
`pipeline.stage`), so a killed run resumes with the shards it had not finished. Rows are sorted by key: the
same input gives the same bytes on every run.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from pipeline.annotate.clip_scorer import ClipScorer
from pipeline.annotate.signals import ShardAnnotator
from pipeline.errors import StageError
from pipeline.options import COUNT, RAY, STAGE_FLAGS, Option, check_options
from pipeline.ray_setup import NATIVE_NOISE, actor_count, init_ray, quiet_ray_data
from pipeline.stage import Finished, Run, Stage, drive, note_attempt
from pipeline.storage import MANIFEST, Location, config_fingerprint, file_sha256
from pipeline.thumbnails import THUMBNAIL_BYTES
from training.quiet import native_lines_to_log

RUN_ONLY = {
    "input",
    "output",
    "clip_batch_size",
    "clip_actors",
    "clip_threads",
    "overwrite",
    "wait_for_lock",
    "progress",
    "ray",
}
OPTIONS = (
    Option("clip_batch_size", **COUNT),
    Option("clip_actors", nullable=True, **COUNT),
    Option("clip_threads", nullable=True, **COUNT),
    *STAGE_FLAGS,
    RAY,
)
COLUMNS = [
    ("key", pa.string()),
    ("shard", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("sha256", pa.string()),
    ("dhash", pa.string()),
    ("thumbnail", pa.binary(THUMBNAIL_BYTES)),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("aspect_ratio", pa.float32()),
    ("caption_chars", pa.int32()),
    ("caption_words", pa.int32()),
    ("error", pa.string()),
]


def meta_name(shard: str) -> str:
    return shard.rsplit(".", 1)[0] + ".parquet"


def input_fingerprint(raw: Location, shards: list[str]) -> str:
    """The crawl's content hash when the input has a manifest, else the tar names and sizes."""
    if raw.exists(MANIFEST):
        return raw.read_json(MANIFEST)["content_hash"]
    return config_fingerprint({s: raw.fs.size(raw.path(s)) for s in shards})


def clip_fingerprint(path: str | None) -> str | None:
    """Which model scored: its config and weight files' names and sizes (hashing gigabytes of weights would
    cost more than annotating a small pool)."""
    if not path:
        return None
    folder = Location(path)
    if not folder.exists("config.json"):
        raise StageError(f"clip={path} is not a transformers CLIP folder (no config.json there)")
    files = {
        n: folder.fs.size(folder.path(n)) for n in folder.listdir() if n.endswith((".safetensors", ".bin", ".json"))
    }
    with folder.fs.open(folder.path("config.json"), "rb") as f:
        files["config.json"] = hashlib.sha256(f.read()).hexdigest()
    return config_fingerprint(files)


def to_table(parts: list[dict]) -> pa.Table:
    """Numpy batches of one shard → an Arrow table in key order; embeddings as fixed-size float16 lists.
    Sizes of an unreadable image (-1, NaN) become nulls."""
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(batch["key"].astype(str), kind="stable")
    batch = {k: v[order] for k, v in batch.items()}
    columns = {}
    for name, kind in COLUMNS:
        values = batch[name]
        if pa.types.is_string(kind):  # Ray hands an all-null object column back as NaN floats
            columns[name] = pa.array([v if isinstance(v, str) else None for v in values.tolist()], type=kind)
        elif pa.types.is_fixed_size_binary(kind):
            columns[name] = pa.array([v if isinstance(v, bytes) else None for v in values.tolist()], type=kind)
        else:
            values = values.astype(kind.to_pandas_dtype())
            columns[name] = pa.array(values, type=kind, mask=~np.isfinite(values) | (values < 0))
    if "clip_score" in batch:
        unreadable = np.array([isinstance(e, str) for e in batch["error"]])
        for name in ("image_embedding", "text_embedding"):
            values = np.ascontiguousarray(batch[name], dtype=np.float16)
            dim = values.shape[1]
            # Null elements, not a null list: pyarrow 25 writes a null fixed-size list that it cannot read back
            # (apache/arrow#35692). Readers see a row of nulls (NaN) for an unreadable image.
            elements = pa.array(values.reshape(-1), mask=np.repeat(unreadable, dim))
            columns[name] = pa.FixedSizeListArray.from_arrays(elements, dim)
        columns["clip_score"] = pa.array(batch["clip_score"].astype(np.float32), mask=~np.isfinite(batch["clip_score"]))
    return pa.table(columns)


def empty_table(dim: int | None) -> pa.Table:
    fields = [pa.field(n, t) for n, t in COLUMNS]
    if dim:
        fields += [
            pa.field("image_embedding", pa.list_(pa.float16(), dim)),
            pa.field("text_embedding", pa.list_(pa.float16(), dim)),
            pa.field("clip_score", pa.float32()),
        ]
    return pa.schema(fields).empty_table()


class CountedShardAnnotator(ShardAnnotator):
    """`ShardAnnotator` that notes each shard's attempt as it starts (`pipeline.stage.note_attempt`), so that a
    shard Ray reads again after its worker died shows in the summary."""

    def __init__(self, input_url: str, output_url: str, attempts: str):
        super().__init__(input_url)
        self.output, self.attempts = Location(output_url), attempts

    def __call__(self, batch: dict):
        for shard in batch["shard"]:
            note_attempt(self.output, str(shard), self.attempts)
            yield from super().__call__({"shard": [shard]})


def _stream(cfg: dict, todo: list[str], out: Location, bar, attempts: str):
    """Run the Ray Data pipeline over the shards in `todo`; write each shard's parquet when it is whole and
    yield (shard, its done record)."""
    import ray

    init_ray(cfg["ray"]["num_cpus"])
    quiet_ray_data()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = (cfg["clip_actors"] or max(1, gpus)) if cfg["clip"] else 0
    # CPU-side readers take the CPUs that CLIP actors on CPU leave; the pool grows as blocks wait for it.
    readers = actor_count(None, len(todo)) - (0 if gpus else actors)
    dataset = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    dataset = dataset.map_batches(
        CountedShardAnnotator,
        fn_constructor_kwargs={"input_url": cfg["input"], "output_url": out.url, "attempts": attempts},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, readers)),
    )
    if cfg["clip"]:
        dataset = dataset.map_batches(
            ClipScorer,
            fn_constructor_kwargs={
                "clip_path": cfg["clip"],
                "batch_size": int(cfg["clip_batch_size"]),
                "threads": cfg["clip_threads"],
            },
            batch_size=int(cfg["clip_batch_size"]),
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
    dataset = dataset.drop_columns(["image"])
    pending: dict[str, list[dict]] = {}
    seen: dict[str, int] = {}
    with native_lines_to_log(*NATIVE_NOISE):  # Ray's C++ notice about actor pools: to the log
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(len(batch["key"]))
            shard_of_row = batch["shard"].astype(str)
            for shard in np.unique(shard_of_row):  # a batch may hold rows of several shards
                rows = shard_of_row == shard
                pending.setdefault(shard, []).append({k: v[rows] for k, v in batch.items()})
                seen[shard] = seen.get(shard, 0) + int(rows.sum())
                if seen[shard] == int(batch["shard_samples"][rows][0]):
                    sha = out.write_parquet(meta_name(shard), to_table(pending.pop(shard)))
                    yield str(shard), {"shard": str(shard), "samples": seen[shard], "sha256": sha}
    for shard in todo:  # shards with no samples (every URL failed) never reach the loop above
        if shard not in seen:
            sha = out.write_parquet(meta_name(shard), empty_table(_clip_dim(cfg["clip"])))
            yield shard, {"shard": shard, "samples": 0, "sha256": sha}


def _clip_dim(path: str | None) -> int | None:
    if not path:
        return None
    return int(Location(path).read_json("config.json")["projection_dim"])


class AnnotateStage(Stage):
    """Units are the input tars; each one's output is `{shard}.parquet`, written on the driver as the streamed
    rows of the shard are all in. `_work/` stays after the manifest, as the marker of whose output this is."""

    name, what, keep_work = "annotate", "annotation", True

    def __init__(self, cfg: dict):
        self.started = time.time()
        for key in ("input", "output"):
            if "://" not in str(cfg[key]):  # Ray workers may run in another directory than this driver
                cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
        self.raw = Location(cfg["input"])
        self.shards = [n for n in self.raw.listdir() if n.endswith(".tar")]
        if not self.shards:
            raise StageError(
                f"input {self.raw.url} holds no .tar shards; expected the output of pipeline.crawl or img2dataset"
            )
        config = {k: v for k, v in cfg.items() if k not in RUN_ONLY}
        self.input_hash = input_fingerprint(self.raw, self.shards)
        self.identity = config_fingerprint(
            {"config": config, "input": self.input_hash, "clip": clip_fingerprint(cfg["clip"])}
        )
        self.cfg, self.output = cfg, Location(cfg["output"])

    def plan(self, work: Location) -> dict:
        return {"units": self.shards}

    def bar(self, run: Run, units: list[str], retry: bool) -> dict:
        return {"total": sum(_successes(self.raw, s) for s in units) or None, "desc": "annotate", "unit": "sample"}

    def map(self, units: list[str], bar, attempts: str):
        return _stream(self.cfg, units, self.output, bar, attempts)

    def finish(self, run: Run) -> Finished:
        names = [meta_name(s) for s in run.done]
        errors = 0
        samples = 0
        for name in names:
            table = pq.read_table(self.output.path(name), columns=["error"], filesystem=self.output.fs)
            samples += table.num_rows
            errors += table.num_rows - table.column("error").null_count
        counts = {"shards": len(names), "samples": samples, "unreadable": errors}
        seconds = run.seconds
        extra = {
            "input_content_hash": self.input_hash,
            "last_run": {"shards_annotated": len(run.fresh), "seconds": round(seconds, 3)},
        }
        rate = samples / seconds if run.fresh and seconds else 0.0
        summary = f"annotate summary: {samples} samples in {len(names)} shards ({errors} unreadable)" + (
            f"; {len(run.fresh)} shards in {seconds:.1f}s: {rate:.1f} samples/s" if run.fresh else ""
        )
        return Finished(counts, {n: file_sha256(self.output, n) for n in names}, extra, summary)


def annotate(cfg: DictConfig | dict) -> dict:
    """Run the annotate stage; returns its manifest."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_options("annotate", cfg, OPTIONS)
    return drive(AnnotateStage(cfg))


def _successes(raw: Location, shard: str) -> int:
    """Samples a crawl shard holds, from its stats file when it has one (for the progress bar only)."""
    stats = shard.rsplit(".", 1)[0] + "_stats.json"
    return int(raw.read_json(stats).get("successes", 0)) if raw.exists(stats) else 0
