"""`ShardCrawler`: the crawl's per-worker class. One instance per Ray actor; each call crawls whole shards.

Inside a shard, downloads run concurrently on one asyncio loop and decoding/resizing on a small thread pool
(PIL releases the GIL while it decodes, resizes and encodes). A semaphore bounds the URLs in flight *including*
their processing, so at most `concurrency` bodies are ever held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from pipeline.crawl.fetch import TRANSIENT_REASONS, Fetcher, FetchSettings
from pipeline.crawl.guard import AddressGuard
from pipeline.crawl.image import ImageProcessor, ImageSettings
from pipeline.crawl.shard_writer import BASE_SCHEMA, ShardWriter, output_schema, shard_files, shard_name, shard_stats
from pipeline.stage import WORK
from pipeline.storage import Location
from pipeline.tar_io import iter_tar_samples

STATUS_OF_FETCH_FAILURE = "failed_to_download"
STATUS_OF_IMAGE_FAILURE = "failed_to_resize"


class ShardCrawler:
    """`ShardCrawler(settings, retry)(shard)` crawls the shard named `shard` ("00003") from its plan, or (with
    `retry`) re-fetches its transient failures; commits it and returns its stats (the stage driver records them
    as the shard's done record)."""

    def __init__(self, settings: dict, retry: bool = False):
        self.output = Location(settings["output"])
        self.plan = Location(f"{settings['output']}/{WORK}")
        self.retry = retry
        self.fetch_settings = FetchSettings(**settings["fetch"])
        self.guard = AddressGuard(settings["allow_networks"], settings["resolve"])
        self.processor = ImageProcessor(ImageSettings(**settings["image"]))
        self.extension = settings["image"]["encode_format"]
        self.concurrency = int(settings["concurrency"])
        self.pool = ThreadPoolExecutor(int(settings["image_threads"]), thread_name_prefix="image")

    def __call__(self, shard: str) -> dict:
        shard_id = int(shard)
        return {"shard_id": shard_id, **(self.retry_shard(shard_id) if self.retry else self.crawl_shard(shard_id))}

    # -- whole shards --------------------------------------------------------------------------------
    def crawl_shard(self, shard_id: int) -> dict:
        started = time.time()
        table = pq.read_table(self.plan.path(f"{shard_name(shard_id)}.parquet"))
        extras = [f for f in table.schema if f.name not in ("key", "url", "caption", "duplicate_of")]
        writer = ShardWriter(self.output, shard_id, output_schema(extras), self.extension)
        try:
            records, downloaded = asyncio.run(self._crawl_rows(table.to_pylist(), writer))
        except BaseException:
            writer.abort()
            raise
        stats = shard_stats(records, started, downloaded)
        writer.commit(records, stats)
        return stats

    def retry_shard(self, shard_id: int) -> dict:
        """Fetch again the rows that failed for a transient reason; rewrite the shard only if there were any."""
        started = time.time()
        tar_name, parquet_name, stats_name = shard_files(shard_id)
        table = pq.read_table(self.output.path(parquet_name))
        records = table.to_pylist()
        again = [r for r in records if r["reason"] in TRANSIENT_REASONS]
        if not again:
            return {**self.output.read_json(stats_name), "retried": 0}
        extras = [f for f in table.schema if f.name not in BASE_SCHEMA.names]
        writer = ShardWriter(self.output, shard_id, output_schema(extras), self.extension)
        try:
            copy_tar_samples(self.output, tar_name, writer)
            fresh, downloaded = asyncio.run(self._crawl_rows([{**r, "duplicate_of": None} for r in again], writer))
        except BaseException:
            writer.abort()
            raise
        by_key = {r["key"]: r for r in records}
        by_key.update({r["key"]: r for r in fresh})
        merged = list(by_key.values())
        previous = self.output.read_json(stats_name)
        stats = {**shard_stats(merged, started, previous["bytes_downloaded"] + downloaded), "retried": len(again)}
        # Without its stats file the shard reads as incomplete while its files are swapped: a crash here
        # leaves a shard that the next run crawls again from the plan, never a tar and parquet that disagree.
        self.output.remove(stats_name)
        writer.commit(merged, stats)
        return stats

    # -- rows ----------------------------------------------------------------------------------------
    async def _crawl_rows(self, rows: list[dict], writer: ShardWriter) -> tuple[list[dict], int]:
        loop = asyncio.get_running_loop()
        in_flight = asyncio.Semaphore(self.concurrency)
        downloaded = 0

        async def one(row: dict) -> dict:
            nonlocal downloaded
            record = {k: v for k, v in row.items() if k != "duplicate_of"}
            record.update(
                status=None,
                reason=None,
                error_message=None,
                width=None,
                height=None,
                original_width=None,
                original_height=None,
                exif=None,
                sha256=None,
            )
            if row.get("duplicate_of"):
                return {
                    **record,
                    "status": "duplicate",
                    "reason": "duplicate_url",
                    "error_message": f"duplicate of key {row['duplicate_of']}",
                }
            if not row["url"]:
                return {
                    **record,
                    "status": STATUS_OF_FETCH_FAILURE,
                    "reason": "invalid_url",
                    "error_message": "empty URL",
                }
            async with in_flight:
                fetched = await fetcher.fetch(row["url"])
                if fetched.data is None:
                    return {
                        **record,
                        "status": STATUS_OF_FETCH_FAILURE,
                        "reason": fetched.reason,
                        "error_message": fetched.message,
                    }
                downloaded += len(fetched.data)
                digest, processed = await loop.run_in_executor(self.pool, self._process, fetched.data)
            record["sha256"] = digest
            if processed.reason:
                return {
                    **record,
                    "status": STATUS_OF_IMAGE_FAILURE,
                    "reason": processed.reason,
                    "error_message": processed.message,
                }
            record.update(
                status="success",
                width=processed.width,
                height=processed.height,
                original_width=processed.original_width,
                original_height=processed.original_height,
                exif=processed.exif,
            )
            writer.add(record, processed.data)
            return record

        async with Fetcher(self.fetch_settings, self.guard, connections=self.concurrency) as fetcher:
            records = await asyncio.gather(*(one(row) for row in rows))
        return list(records), downloaded

    def _process(self, data: bytes):
        return hashlib.sha256(data).hexdigest(), self.processor(data)


def copy_tar_samples(location: Location, tar_name: str, writer: ShardWriter) -> None:
    """Copy every sample of an existing shard tar into `writer`, unchanged."""
    with location.fs.open(location.path(tar_name), "rb") as f:
        for sample in iter_tar_samples(f):
            writer.add_raw(sample)
