"""`ShardCrawler`: the crawl's per-worker class. One instance per Ray actor; each call crawls whole shards.

Inside a shard, downloads run concurrently on one asyncio loop and decoding/resizing on a small thread pool
(PIL releases the GIL while it decodes, resizes and encodes). A semaphore bounds the URLs in flight *including*
their processing, so at most `concurrency` bodies are ever held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
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
# What a crawl adds to an input row: the output columns after the row's own key, url and caption.
RESULT_FIELDS = tuple(name for name in BASE_SCHEMA.names if name not in ("key", "url", "caption"))


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
        table = pq.read_table(self.plan.path(f"{shard_name(shard_id)}.parquet"), filesystem=self.plan.fs)
        extras = [f for f in table.schema if f.name not in ("key", "url", "caption", "duplicate_of")]
        writer = ShardWriter(self.output, shard_id, output_schema(extras), self.extension, rows=len(table))
        try:
            records, downloaded = asyncio.run(self._crawl_rows(list(enumerate(table.to_pylist())), writer))
        except BaseException:
            writer.abort()
            raise
        stats = shard_stats(records, started, downloaded)
        # The worker's high-water mark so far, so that a crawl's memory can be read from its own output.
        stats["worker_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        writer.commit(records, stats)
        return stats

    def retry_shard(self, shard_id: int) -> dict:
        """Fetch again the rows that failed for a transient reason; rewrite the shard only if there were any."""
        started = time.time()
        tar_name, parquet_name, stats_name = shard_files(shard_id)
        table = pq.read_table(self.output.path(parquet_name), filesystem=self.output.fs)
        records = table.to_pylist()  # in key order: a row's index is its position in the tar
        again = [(i, r) for i, r in enumerate(records) if r["reason"] in TRANSIENT_REASONS]
        if not again:
            return {**self.output.read_json(stats_name), "retried": 0}
        extras = [f for f in table.schema if f.name not in BASE_SCHEMA.names]
        writer = ShardWriter(self.output, shard_id, output_schema(extras), self.extension)
        try:
            position = {r["key"]: i for i, r in enumerate(records)}
            kept = copy_tar_samples(self.output, tar_name, writer, position)
            for i, r in enumerate(records):
                if r["key"] not in kept and r["reason"] not in TRANSIENT_REASONS:
                    writer.skip(i)
            again_rows = [(i, {**r, "duplicate_of": None}) for i, r in again]
            fresh, downloaded = asyncio.run(self._crawl_rows(again_rows, writer))
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
    async def _crawl_rows(self, rows: list[tuple[int, dict]], writer: ShardWriter) -> tuple[list[dict], int]:
        """Crawl (position, row) pairs; every position is put into `writer` once, with its sample or none."""
        in_flight = asyncio.Semaphore(self.concurrency)
        downloaded = 0

        async def one(position: int, row: dict) -> dict:
            nonlocal downloaded
            record = {k: v for k, v in row.items() if k != "duplicate_of"}
            record.update({k: None for k in RESULT_FIELDS})
            image = None
            try:
                outcome, image, size = await self._crawl_row(row, in_flight)
                downloaded += size
                record.update(outcome)
            except Exception as err:  # a bug or a library failure we did not foresee: this row, not the job
                failure = {"status": STATUS_OF_FETCH_FAILURE, "reason": "internal_error"}
                record.update(failure, error_message=f"{type(err).__name__}: {err}")
                image = None
            finally:
                if image is None:
                    writer.skip(position)
            if image is not None:
                writer.add(position, record, image)
            return record

        async with Fetcher(self.fetch_settings, self.guard, connections=self.concurrency) as fetcher:
            self.fetcher = fetcher
            records = await asyncio.gather(*(one(position, row) for position, row in rows))
        return list(records), downloaded

    async def _crawl_row(self, row: dict, in_flight: asyncio.Semaphore) -> tuple[dict, bytes | None, int]:
        """(the record's result fields, the encoded image or None, bytes downloaded) for one row."""
        if row.get("duplicate_of"):
            duplicate = {"status": "duplicate", "reason": "duplicate_url"}
            return {**duplicate, "error_message": f"duplicate of key {row['duplicate_of']}"}, None, 0
        if not row["url"]:
            return {"status": STATUS_OF_FETCH_FAILURE, "reason": "invalid_url", "error_message": "empty URL"}, None, 0
        async with in_flight:
            fetched = await self.fetcher.fetch(row["url"])
            if fetched.data is None:
                failure = {"status": STATUS_OF_FETCH_FAILURE, "reason": fetched.reason}
                return {**failure, "error_message": fetched.message}, None, 0
            loop = asyncio.get_running_loop()
            size = len(fetched.data)
            try:
                digest, processed = await loop.run_in_executor(self.pool, self._process, fetched.data)
            except Exception as err:  # the image processor's own boundary failed: still only this row
                failure = {"status": STATUS_OF_IMAGE_FAILURE, "reason": "internal_error"}
                return {**failure, "error_message": f"{type(err).__name__}: {err}"}, None, size
        if processed.reason:
            failure = {"status": STATUS_OF_IMAGE_FAILURE, "reason": processed.reason}
            return {**failure, "error_message": processed.message, "sha256": digest}, None, size
        success = {
            "status": "success",
            "sha256": digest,
            "width": processed.width,
            "height": processed.height,
            "original_width": processed.original_width,
            "original_height": processed.original_height,
            "exif": processed.exif,
        }
        return success, processed.data, size

    def _process(self, data: bytes):
        return hashlib.sha256(data).hexdigest(), self.processor(data)


def copy_tar_samples(location: Location, tar_name: str, writer: ShardWriter, position: dict[str, int]) -> set[str]:
    """Copy every sample of an existing shard tar into `writer`, unchanged, at its key's position; returns
    the keys copied."""
    keys = set()
    with location.fs.open(location.path(tar_name), "rb") as f:
        for sample in iter_tar_samples(f):
            writer.add_raw(position[sample["__key__"]], sample)
            keys.add(sample["__key__"])
    return keys
