"""`crawl(cfg)`: URL list → raw shards, on Ray. Plans shards once, crawls the incomplete ones, writes the
manifest last (all by `pipeline.stage.drive`); a second run resumes, and `retry_failed=true` fetches the
transient failures again."""

from __future__ import annotations

import os
import tempfile
import time

from fsspec.implementations.local import LocalFileSystem
from omegaconf import DictConfig, OmegaConf

from pipeline.crawl.crawler import ShardCrawler
from pipeline.crawl.fetch import TRANSIENT_REASONS
from pipeline.crawl.guard import AddressGuard
from pipeline.crawl.image import ImageSettings
from pipeline.crawl.inputs import open_input
from pipeline.crawl.planning import write_plan
from pipeline.crawl.shard_writer import STATUSES, shard_name
from pipeline.errors import StageError
from pipeline.options import COUNT, RAY, Option, check_options
from pipeline.stage import Finished, Run, Stage, drive
from pipeline.storage import Location, code_version, config_fingerprint

# Options that change *how fast*, not *what*: a resume may change them.
RUN_ONLY = {
    "input",
    "output",
    "processes",
    "concurrency",
    "image_threads",
    "retry_failed",
    "overwrite",
    "wait_for_lock",
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
    "reducing_gap",
    "decode_formats",
)
OPTIONS = (
    Option("number_sample_per_shard", **COUNT),
    Option("processes", nullable=True, **COUNT),
    Option("concurrency", **COUNT),
    Option("image_threads", **COUNT),
    Option("timeout", float, low=0.001),
    Option("retries", low=0),
    Option("retry_backoff", float, low=0),
    Option("max_bytes", **COUNT),
    Option("max_redirects", low=0),
    Option("image_size", **COUNT),
    Option("encode_quality", low=0, high=100),
    Option("max_pixels", **COUNT),
    Option("min_image_size", low=0),
    Option("max_aspect_ratio", float, low=1, nullable=True),
    Option("reducing_gap", float, low=1, nullable=True),
    *(Option(k, bool) for k in ("resize_only_if_bigger", "retry_failed", "overwrite", "wait_for_lock", "progress")),
    RAY,
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


class CrawlStage(Stage):
    """Units are planned shards ("00003"): each one's input rows under `_work/`, its stats its done record.
    `_work/` stays after the manifest: `retry_failed=true` reruns a finished crawl from it."""

    name, what, keep_work = "crawl", "a crawl", True

    def __init__(self, cfg: dict):
        self.started = time.time()
        if "://" not in str(cfg["output"]):  # Ray workers may run in another directory than this driver
            cfg["output"] = os.path.abspath(os.path.expanduser(str(cfg["output"])))
        # Opened, not read: the list is streamed once when planning (it may be billions of rows).
        self.urls = open_input(
            cfg["input"], cfg["input_format"], cfg["url_col"], cfg["caption_col"], cfg["extra_columns"]
        )
        self.input_fingerprint, local_root = self.urls.fingerprint, self.urls.local_root
        config = {k: v for k, v in cfg.items() if k not in RUN_ONLY}
        self.cfg, self.output = cfg, Location(cfg["output"])
        self.identity = config_fingerprint({"config": config, "input": self.input_fingerprint})
        self.redo_when_complete = bool(cfg["retry_failed"])
        self.settings = worker_settings(cfg, local_root)
        self.successes = 0  # for the bar's postfix

    def describe(self, manifest: dict) -> str:
        return f"{manifest['counts']['success']} images"

    def plan(self, work: Location) -> dict:
        per = int(self.cfg["number_sample_per_shard"])
        # The dedup spills to local disk: beside the plan when that is local, else in a temporary folder.
        local = isinstance(work.fs, LocalFileSystem)
        spill = work.path("spill") if local else tempfile.mkdtemp(prefix="pixelmill-plan-")
        counts = write_plan(self.urls.batches(), per, work, spill)  # removes `spill`
        units = [shard_name(i) for i in range(counts["shards"])]
        return {"units": units, "rows": counts["rows"], "shards": counts["shards"], "number_sample_per_shard": per}

    def worker(self, retry: bool) -> tuple[type, dict]:
        return ShardCrawler, {"settings": self.settings, "retry": retry}

    def retry_units(self, run: Run) -> list[str]:
        if not self.cfg["retry_failed"]:
            return []
        return [unit for unit, stats in run.done.items() if _reasons(stats) & TRANSIENT_REASONS]

    def bar(self, run: Run, units: list[str], retry: bool) -> dict:
        """The bar counts input rows for a crawl, shards for a retry."""
        if retry:
            return {"total": len(units), "desc": "retry", "unit": "shard"}
        per, rows = run.plan["number_sample_per_shard"], run.plan["rows"]
        resumed = run.plan["shards"] - len(units)
        desc = f"crawl ({resumed} of {run.plan['shards']} shards already done)" if resumed else "crawl"
        return {"total": sum(min(per, rows - int(u) * per) for u in units), "desc": desc, "unit": "url"}

    def advance(self, bar, record: dict) -> None:
        bar.update(1 if "retried" in record else record["count"])
        self.successes += record["successes"]
        bar.set_postfix(ok=self.successes)

    def finish(self, run: Run) -> Finished:
        counts, file_hashes = totals(list(run.done.values()))
        if run.plan["rows"] - counts["rows"] or sum(counts[s] for s in STATUSES) != counts["rows"]:
            raise RuntimeError(
                f"crawl of {self.output.url} accounts for {counts['rows']} of {run.plan['rows']} input rows"
            )
        last_run = {
            "shards_crawled": len(run.fresh),
            "rows_retried": sum(r["retried"] for r in run.again.values()),
            "successes_this_run": sum(r["successes"] for r in run.fresh.values()),
            "crawl_seconds": round(run.seconds, 3),
        }
        extra = {"input_fingerprint": self.input_fingerprint, "last_run": last_run}
        return Finished(counts, file_hashes, extra, summary(counts, last_run))


def _reasons(stats: dict) -> set[str]:
    return {reason for reasons in stats["reasons"].values() for reason in reasons}


def totals(shard_stats: list[dict]) -> tuple[dict, dict[str, str]]:
    """Counts over every shard's stats, and each output file's sha256 as recorded when it was written."""
    counts = {"rows": 0, **{s: 0 for s in STATUSES}, "bytes_downloaded": 0, "reasons": {}}
    file_hashes: dict[str, str] = {}
    for stats in shard_stats:
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
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_options("crawl", cfg, OPTIONS)
    return drive(CrawlStage(cfg))


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
