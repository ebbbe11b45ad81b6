"""`filter_samples(cfg)`: metadata → selection (key, shard, keep, reason) and a funnel report.

Pure pyarrow/numpy over the annotate output: it never opens an image, so trying another rule costs seconds.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import StageError
from pipeline.filter.report import funnel_chart, funnel_table, log_filter
from pipeline.lock import output_lock
from pipeline.options import Option, check_options
from pipeline.stage import already_complete
from pipeline.storage import MANIFEST, Location, config_fingerprint, write_manifest

SELECTION = "selection.parquet"
UNREADABLE = "unreadable_image"


def build_rules(filter_cfg: dict) -> list[tuple[str, object]]:
    """(name, rule) in the order they run: row rules, then set rules, each group in config order.
    A rule set to null is off (`filter.near_duplicate=null`)."""
    rules = []
    for name, spec in filter_cfg.items():
        if spec is None:
            continue
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise StageError(f"filter.{name} is {spec!r}; expected a rule with a _target_ (see conf/filter/basic.yaml)")
        try:
            rules.append((name, instantiate(spec)))
        except Exception as err:  # Hydra wraps the rule's own StageError
            cause = err.__cause__ if isinstance(err.__cause__, StageError) else err
            raise StageError(f"filter.{name}: {cause}") from err
    return [r for r in rules if r[1].kind == "row"] + [r for r in rules if r[1].kind == "set"]


def read_metadata(location: Location, columns: list[str]) -> dict[str, np.ndarray]:
    names = [n for n in location.listdir() if n.endswith(".parquet") and not n.startswith("_")]
    if not names:
        raise StageError(
            f"input {location.url} holds no metadata parquet files; expected the output of pipeline.annotate"
        )
    dataset = ds.dataset([location.path(n) for n in names], format="parquet", filesystem=location.fs)
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise StageError(
            f"the rules need column(s) {missing}, which {location.url} lacks"
            + ("; annotate with clip=<CLIP folder> for clip_score" if "clip_score" in missing else "")
        )
    table = dataset.to_table(columns=columns).sort_by("key")
    meta = {}
    for name in columns:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            meta[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls → NaN
        else:
            meta[name] = np.asarray(column.to_pylist(), dtype=object)
    return meta


def apply_rules(meta: dict[str, np.ndarray], rules) -> tuple[np.ndarray, list[dict]]:
    """Every row's reason (None: kept) and the funnel: rows left after each step."""
    n = len(meta["key"])
    reason = np.full(n, None, dtype=object)
    unreadable = np.array([isinstance(e, str) for e in meta["error"]])
    reason[unreadable] = UNREADABLE
    funnel = [
        {"step": "input", "dropped": 0, "left": n},
        {"step": UNREADABLE, "dropped": int(unreadable.sum()), "left": int(n - unreadable.sum())},
    ]
    for name, rule in rules:
        alive = reason == None  # noqa: E711 (elementwise)
        dropped = rule.drop(meta, alive) & alive
        reason[dropped] = name
        funnel.append({"step": name, "dropped": int(dropped.sum()), "left": int((reason == None).sum())})  # noqa: E711
    return reason, funnel


def filter_samples(cfg: DictConfig | dict) -> dict:
    """Run the filter stage; returns its manifest (with the funnel). Holds the output's lock throughout."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_options("filter", cfg, (Option("wait_for_lock", bool), Option("tracking", bool)))
    with output_lock(Location(cfg["output"]), "filter", bool(cfg.get("wait_for_lock"))):
        return _filter_samples(cfg)


def _filter_samples(cfg: dict) -> dict:
    started = time.time()
    meta_dir, out = Location(cfg["input"]), Location(cfg["output"])
    if not meta_dir.exists(MANIFEST):
        raise StageError(f"input {meta_dir.url} has no manifest.json: annotate has not finished there")
    input_hash = meta_dir.read_json(MANIFEST)["content_hash"]
    identity = config_fingerprint({"filter": cfg["filter"], "input": input_hash})
    # One in-memory pass, no units to resume: of the stage driver only its completion check applies.
    manifest = already_complete("filter", out, identity, lambda m: f"{m['counts']['kept']} kept")
    if manifest:
        return manifest
    rules = build_rules(cfg["filter"])
    columns = sorted({"key", "shard", "error", *(c for _, rule in rules for c in rule.columns)})
    meta = read_metadata(meta_dir, columns)
    reason, funnel = apply_rules(meta, rules)
    out.makedirs()
    out.remove(MANIFEST)
    selection = pa.table(
        {
            "key": meta["key"].astype(str),
            "shard": meta["shard"].astype(str),
            "keep": pa.array(reason == None),  # noqa: E711  (elementwise on a numpy array)
            "reason": pa.array(reason.tolist(), pa.string()),
        }
    )  # noqa: E711
    hashes = {SELECTION: out.write_parquet(SELECTION, selection)}
    table_text = funnel_table(funnel)
    with out.open_atomic("funnel.txt", "w") as f:
        f.write(table_text + "\n")
    chart = funnel_chart(funnel, title=os.path.basename(out.url.rstrip("/")))
    with out.open_atomic("funnel.png") as f:
        f.write(chart)
    counts = {
        "rows": len(reason),
        "kept": int((reason == None).sum()),  # noqa: E711
        "dropped": {s["step"]: s["dropped"] for s in funnel[1:] if s["dropped"]},
    }
    manifest = write_manifest(
        out, "filter", cfg, counts, hashes, started, identity=identity, input_content_hash=input_hash, funnel=funnel
    )
    print(f"filter funnel ({meta_dir.url} → {out.url}):\n{table_text}")
    if cfg.get("tracking", True):
        log_filter(manifest, chart, table_text)
    return manifest
