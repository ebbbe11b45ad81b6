"""`filter_samples(cfg)`: metadata → selection (key, shard, keep, reason, duplicate_of, group) and a report:
the funnel, a grid of sample pairs per duplicate rule, and the eps table of a rule that has one.

Pure pyarrow/numpy over the annotate output: it never opens an image, so trying another rule costs seconds.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import StageError
from pipeline.filter.pairs import RulePairs
from pipeline.filter.report import log_filter, write_report
from pipeline.filter.rules import TEXT, TEXT_PIECE, DuplicateRule, Duplicates, present, text_to_arrow
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


def read_metadata(location: Location, columns: list[str], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """`columns` (an error when one is missing) and those of `optional` that the metadata has, in key order."""
    return metadata_arrays(read_metadata_table(location, columns, optional))  # the table goes once converted


def read_metadata_table(location: Location, columns: list[str], optional: tuple[str, ...] = ()) -> pa.Table:
    """The metadata's `columns` (and those of `optional` it has) as one Arrow table, in file order."""
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
    columns = [*columns, *(c for c in optional if c in dataset.schema.names and c not in columns)]
    return dataset.to_table(columns=columns)


def metadata_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Each column of `table`, in key order, as the rules read it: numbers as float64 (null → NaN), embeddings
    as (rows, dim) float32 (a null row → NaN), text as TEXT, anything else (thumbnails' bytes) as objects.
    Columns are put in key order one at a time: a sorted copy of the whole table would double the peak."""
    order = pc.sort_indices(table, sort_keys=[("key", "ascending")])
    meta = {}
    for name in table.column_names:
        column = table.column(name).take(order)
        table = table.drop_columns([name])  # this function holds the only reference: its memory goes now
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            meta[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)
        elif pa.types.is_fixed_size_list(column.type):
            dim, start = column.type.list_size, 0
            meta[name] = np.empty((len(column), dim), np.float32)
            for chunk in column.chunks:
                # `.values` ignores the chunk's offset but keeps null rows' slots; flatten() would drop them.
                values = chunk.values.slice(chunk.offset * dim, len(chunk) * dim).to_numpy(zero_copy_only=False)
                block = meta[name][start : start + len(chunk)]
                block[:] = values.reshape(len(chunk), dim)
                block[chunk.is_null().to_numpy(zero_copy_only=False)] = np.nan
                start += len(chunk)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            meta[name] = np.empty(len(column), TEXT)
            for start in range(0, len(column), TEXT_PIECE):
                piece = column.slice(start, TEXT_PIECE)
                meta[name][start : start + len(piece)] = piece.to_numpy(zero_copy_only=False)
        else:
            meta[name] = np.asarray(column.to_pylist(), dtype=object)
    return meta


@dataclass
class FilterOutcome:
    """What the rules decided. Per row: `reason` (the rule that dropped it; None: kept), `duplicate_of` (the
    row it repeats, -1 if no duplicate rule dropped it) and `group` (-1: in none). Per step, the funnel; per
    duplicate rule, the pairs it found; per rule whose answer has an `eps_table`, that table over the rows it saw."""

    reason: np.ndarray
    funnel: list[dict]
    duplicate_of: np.ndarray
    group: np.ndarray
    pairs: list[RulePairs]
    eps_tables: dict[str, list[dict]]


def apply_rules(meta: dict[str, np.ndarray], rules) -> FilterOutcome:
    """Run the rules in order, each over the rows still alive. A duplicate rule's links end at rows that no
    duplicate rule dropped (see `_link_duplicates`); a set rule that is not a duplicate rule (clip_score's
    top_fraction) may still drop a row that others repeat: their links and group then name a dropped row."""
    n = len(meta["key"])
    reason = np.full(n, None, dtype=object)
    unreadable = present(meta["error"])
    reason[unreadable] = UNREADABLE
    funnel = [
        {"step": "input", "dropped": 0, "left": n},
        {"step": UNREADABLE, "dropped": int(unreadable.sum()), "left": int(n - unreadable.sum())},
    ]
    duplicate_of = np.full(n, -1, np.int64)
    pairs, eps_tables = [], {}
    for name, rule in rules:
        alive = reason == None  # noqa: E711 (elementwise)
        if isinstance(rule, DuplicateRule):
            found = rule.duplicates(meta, alive)
            dropped, rule_pairs = _link_duplicates(name, rule, found, alive, duplicate_of)
            pairs.append(rule_pairs)
            if hasattr(found, "eps_table"):  # from the same pass, over the rows this rule saw
                eps_tables[name] = found.eps_table()
        else:
            dropped = rule.drop(meta, alive) & alive
        reason[dropped] = name
        funnel.append({"step": name, "dropped": int(dropped.sum()), "left": int((reason == None).sum())})  # noqa: E711
    return FilterOutcome(reason, funnel, duplicate_of, duplicate_groups(duplicate_of), pairs, eps_tables)


def _link_duplicates(
    name: str, rule: DuplicateRule, found: Duplicates, alive, duplicate_of
) -> tuple[np.ndarray, RulePairs]:
    """The rows `rule` drops (`found`), linked in `duplicate_of` (updated in place) to the rows they repeat.
    Rows that earlier rules linked to a row this rule drops move on to the row that one repeats: links then
    always name a row still alive, so one step per rule keeps every chain (x → r → k) one link long (x → k)."""
    dropped = (found.of >= 0) & alive
    rows = np.flatnonzero(dropped)
    targets = found.of[rows]
    if len(rows) and (targets.max() >= len(alive) or not alive[targets].all() or dropped[targets].any()):
        raise StageError(
            f"filter.{name}: {type(rule).__name__}.duplicates linked a dropped row to a row that is not alive or "
            "that it drops too; expected each dropped row to repeat a row it keeps"
        )
    linked = np.flatnonzero(duplicate_of >= 0)
    moved = linked[dropped[duplicate_of[linked]]]
    duplicate_of[moved] = found.of[duplicate_of[moved]]
    duplicate_of[rows] = targets
    return dropped, RulePairs(name, rule.distance_name, rows, targets, found.distance[rows])


def duplicate_groups(duplicate_of: np.ndarray) -> np.ndarray:
    """Per row, its group (-1: none): a repeated row and the rows that repeat it share an id, numbered 0.. in
    key order of the repeated rows (rows are in key order). A row that nothing repeats is in no group."""
    group = np.full(len(duplicate_of), -1, np.int64)
    linked = duplicate_of >= 0
    repeated = np.unique(duplicate_of[linked])
    group[repeated] = np.arange(len(repeated))
    group[linked] = group[duplicate_of[linked]]
    return group


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
    # Thumbnails only for the pair grids of duplicate rules, and only when annotate stored them.
    wants_thumbnails = any(isinstance(rule, DuplicateRule) for _, rule in rules)
    meta = read_metadata(meta_dir, columns, optional=("thumbnail",) if wants_thumbnails else ())
    outcome = apply_rules(meta, rules)
    reason, keys = outcome.reason, text_to_arrow(meta["key"])
    out.makedirs()
    out.remove(MANIFEST)
    linked = outcome.duplicate_of >= 0
    selection = pa.table(
        {
            "key": keys,
            "shard": text_to_arrow(meta["shard"]),
            "keep": pa.array(reason == None),  # noqa: E711  (elementwise on a numpy array)
            "reason": pa.array(reason, pa.string(), from_pandas=True),
            "duplicate_of": keys.take(pa.array(outcome.duplicate_of, mask=~linked)),
            "group": pa.array(outcome.group, pa.int64(), mask=outcome.group < 0),
        }
    )
    # The content hash is the selection's alone: the report files are views of it.
    hashes = {SELECTION: out.write_parquet(SELECTION, selection)}
    report = write_report(out, outcome, meta, title=os.path.basename(out.url.rstrip("/")))
    counts = {
        "rows": len(reason),
        "kept": int((reason == None).sum()),  # noqa: E711
        "dropped": {s["step"]: s["dropped"] for s in outcome.funnel[1:] if s["dropped"]},
    }
    manifest = write_manifest(
        out,
        "filter",
        cfg,
        counts,
        hashes,
        started,
        identity=identity,
        input_content_hash=input_hash,
        funnel=outcome.funnel,
        report={name: hashlib.sha256(data).hexdigest() for name, data in sorted(report.items())},
    )
    table_text = report["funnel.txt"].decode().rstrip("\n")
    print(f"filter funnel ({meta_dir.url} → {out.url}):\n{table_text}")
    for rule in outcome.eps_tables:
        print(f"eps table of {rule} (rows dropped at each eps, over the rows it saw):")
        print(report[f"eps_{rule}.txt"].decode().rstrip("\n"))
    if cfg.get("tracking", True):
        log_filter(manifest, report["funnel.png"], table_text)
    return manifest
