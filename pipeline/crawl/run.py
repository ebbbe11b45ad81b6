"""`crawl(cfg)`: URL list → raw shards, on Ray. Plans shards once, crawls the incomplete ones, writes the
manifest last; a second run resumes, and `retry_failed=true` fetches the transient failures again."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.crawl.crawler import PLAN_DIR, ShardCrawler
from pipeline.crawl.fetch import TRANSIENT_REASONS
from pipeline.crawl.guard import AddressGuard
from pipeline.crawl.image import ImageSettings
from pipeline.crawl.inputs import plan, read_input
from pipeline.crawl.shard_writer import STATUSES, is_complete, shard_files, shard_name
from pipeline.errors import StageError
from pipeline.ray_setup import actor_count, init_ray, quiet_ray_data
from pipeline.storage import MANIFEST, Location, claim_output, code_version, config_fingerprint, write_manifest

# Options that change *how fast*, not *what*: a resume may change them.
RUN_ONLY = {
    "input",
    "output",
    "processes",
    "concurrency",
    "image_threads",
    "retry_failed",
    "overwrite",
    "progress",
    "ray",
}
FETCH_KEYS = (
    "timeout",
    "retries",
    "retry_backoff",
    "max_bytes",
    "max_redirects",
    "user_agent_token",
    "disallowed_header_directives",
)
IMAGE_KEYS = (
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_format",
    "encode_quality",
    "max_pixels",
    "min_image_size",
    "max_aspect_ratio",
    "downscale_interpolation",
    "upscale_interpolation",
)


def worker_settings(cfg: dict, local_root: str | None) -> dict:
    fetch = {k: cfg[k] for k in FETCH_KEYS}
    fetch["disallowed_header_directives"] = tuple(fetch["disallowed_header_directives"])
    fetch["user_agent"] = (
        f"pixelmill/{code_version().split('+')[0]} (image-text dataset crawler; honours X-Robots-Tag noai)"
    )
    fetch["local_root"] = local_root
    try:  # fail here, in one line, rather than inside every Ray actor
        AddressGuard(cfg["allow_networks"], cfg["resolve"])
        ImageSettings(**{k: cfg[k] for k in IMAGE_KEYS})
    except ValueError as err:
        raise StageError(f"crawl config: {err}") from err
    return {
        "output": cfg["output"],
        "fetch": fetch,
        "image": {k: cfg[k] for k in IMAGE_KEYS},
        "allow_networks": list(cfg["allow_networks"]),
        "resolve": dict(cfg["resolve"]),
        "concurrency": cfg["concurrency"],
        "image_threads": cfg["image_threads"],
    }


def _prepare(out: Location, cfg: dict, identity: str, table, overwrite: bool) -> dict:
    """Reuse the plan of an interrupted run of the same crawl, or write a new one; refuse to mix crawls."""
    existing = claim_output(out, f"{PLAN_DIR}/plan.json", identity, overwrite, "a crawl")
    if existing:
        return existing
    plan_dir = Location(f"{out.url}/{PLAN_DIR}")
    plan_dir.makedirs()
    shards = plan(table, int(cfg["number_sample_per_shard"]))
    for shard_id, shard in enumerate(shards):
        with plan_dir.open_atomic(f"{shard_name(shard_id)}.parquet") as f:
            pq.write_table(shard, f)
    record = {
        "identity": identity,
        "rows": table.num_rows,
        "shards": len(shards),
        "number_sample_per_shard": int(cfg["number_sample_per_shard"]),
    }
    plan_dir.write_json("plan.json", record)  # last: a plan.json means every shard input is there
    return record


def _run_shards(cfg: dict, settings: dict, jobs: list[tuple[int, str]], rows: int, desc: str) -> list[dict]:
    """Crawl (or retry) shards on a pool of ShardCrawler actors; returns each shard's stats. The bar counts
    input rows for a crawl, shards for a retry."""
    import ray

    init_ray(cfg["ray"]["num_cpus"])
    quiet_ray_data()
    items = [{"shard_id": shard_id, "mode": mode} for shard_id, mode in jobs]
    size = actor_count(cfg["processes"], len(items))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardCrawler,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=1,
    )
    results = []
    unit = "url" if rows else "shard"
    with tqdm(total=rows or len(jobs), desc=desc, unit=unit, disable=not cfg["progress"], smoothing=0) as bar:
        for row in dataset.iter_rows():
            stats = json.loads(row["stats"])
            results.append(stats)
            bar.update(stats["count"] if rows else 1)
            bar.set_postfix(ok=sum(s["successes"] for s in results))
    return results


def _reasons(stats: dict) -> set[str]:
    return {reason for reasons in stats["reasons"].values() for reason in reasons}


def totals(out: Location, shards: int) -> tuple[dict, dict[str, str]]:
    """Counts over every shard's stats, and each output file's sha256 as recorded when it was written."""
    counts = {"rows": 0, **{s: 0 for s in STATUSES}, "bytes_downloaded": 0, "reasons": {}}
    file_hashes: dict[str, str] = {}
    for shard_id in range(shards):
        stats = out.read_json(shard_files(shard_id)[2])
        file_hashes.update(stats["sha256"])
        counts["rows"] += stats["count"]
        counts["success"] += stats["successes"]
        counts["failed_to_download"] += stats["failed_to_download"]
        counts["failed_to_resize"] += stats["failed_to_resize"]
        counts["duplicate"] += stats["duplicates"]
        counts["bytes_downloaded"] += stats["bytes_downloaded"]
        for status, reasons in stats["reasons"].items():
            merged = counts["reasons"].setdefault(status, {})
            for reason, n in reasons.items():
                merged[reason] = merged.get(reason, 0) + n
    counts["reasons"] = {
        s: dict(sorted(r.items(), key=lambda kv: (-kv[1], kv[0]))) for s, r in counts["reasons"].items()
    }
    return counts, file_hashes


def crawl(cfg: DictConfig | dict) -> dict:
    """Run the crawl stage; returns its manifest."""
    started = time.time()
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if "://" not in str(cfg["output"]):  # Ray workers may run in another directory than this driver
        cfg["output"] = os.path.abspath(os.path.expanduser(str(cfg["output"])))
    if int(cfg["number_sample_per_shard"]) < 1:
        raise StageError(f"number_sample_per_shard={cfg['number_sample_per_shard']}; expected a positive integer")
    table, local_root, input_fingerprint = read_input(
        cfg["input"], cfg["input_format"], cfg["url_col"], cfg["caption_col"], cfg["extra_columns"]
    )
    config = {k: v for k, v in cfg.items() if k not in RUN_ONLY}
    identity = config_fingerprint({"config": config, "input": input_fingerprint})
    out = Location(cfg["output"])
    out.makedirs()
    if out.exists(MANIFEST):
        manifest = out.read_json(MANIFEST)
        if manifest.get("identity") == identity and not cfg["retry_failed"]:
            print(f"crawl: {out.url} is already complete ({manifest['counts']['success']} images); nothing to do")
            return manifest
    settings = worker_settings(cfg, local_root)
    record = _prepare(out, cfg, identity, table, bool(cfg["overwrite"]))
    out.remove_temporaries()
    shards = record["shards"]
    todo = [i for i in range(shards) if not is_complete(out, i)]
    crawl_started = time.time()
    crawled: list[dict] = []
    if todo:
        out.remove(MANIFEST)
        rows = sum(
            min(record["number_sample_per_shard"], record["rows"] - i * record["number_sample_per_shard"]) for i in todo
        )
        resumed = shards - len(todo)
        desc = f"crawl ({resumed} of {shards} shards already done)" if resumed else "crawl"
        crawled = _run_shards(cfg, settings, [(i, "crawl") for i in todo], rows, desc)
    retried = 0
    if cfg["retry_failed"]:
        transient = [i for i in range(shards) if _reasons(out.read_json(shard_files(i)[2])) & TRANSIENT_REASONS]
        if transient:
            out.remove(MANIFEST)
            results = _run_shards(cfg, settings, [(i, "retry") for i in transient], 0, "retry")
            retried = sum(r["retried"] for r in results)
    crawl_seconds = time.time() - crawl_started
    counts, file_hashes = totals(out, shards)
    lost = record["rows"] - counts["rows"]
    if lost or sum(counts[s] for s in STATUSES) != counts["rows"]:
        raise RuntimeError(f"crawl of {out.url} accounts for {counts['rows']} of {record['rows']} input rows")
    run = {
        "shards_crawled": len(crawled),
        "rows_retried": retried,
        "successes_this_run": sum(r["successes"] for r in crawled),
        "crawl_seconds": round(crawl_seconds, 3),
    }
    manifest = write_manifest(
        out,
        "crawl",
        cfg,
        counts,
        file_hashes,
        started,
        identity=identity,
        input_fingerprint=input_fingerprint,
        last_run=run,
    )
    print(summary(counts, run))
    return manifest


def summary(counts: dict, run: dict) -> str:
    lines = [f"crawl summary: {counts['rows']} rows → {counts['success']} images"]
    for status in STATUSES:
        detail = ", ".join(f"{reason} {n}" for reason, n in counts["reasons"].get(status, {}).items())
        lines.append(f"  {status:<20}{counts[status]:>8}  {detail}".rstrip())
    seconds = run["crawl_seconds"]
    if run["shards_crawled"]:
        rate = run["successes_this_run"] / seconds if seconds else 0.0
        lines.append(f"  {run['shards_crawled']} shards in {seconds:.1f}s: {rate:.1f} images/s")
    if run["rows_retried"]:
        lines.append(f"  retried {run['rows_retried']} rows that had failed for transient reasons")
    return "\n".join(lines)
