"""Filter and shard at scale (`make bench-curate-scale`, or `python bench/curate_scale.py --rows 10000000`):
synthetic metadata in annotate's schema, tiny raw tars holding one member per row, then the filter's basic
rules and the shard stage over them, as a user would chain them. Prints rows/s and the peak memory of the
whole process tree (driver, Ray and its workers: RSS summed, sampled every 0.2 s) per stage.

The near-duplicate rule is off here: it needs annotate's thumbnails; its figures at scale are
bench/dedup_scale.py's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import threading
import time
from multiprocessing import Pool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from curate import ROOT, config

CHUNK = 1_000_000  # metadata rows per parquet file: the bench itself stays in bounded memory


def _descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc (Linux; the bench's machines)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_pages(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1])
    except OSError:
        return 0


class PeakMemory:
    """Peak of the RSS summed over this process and every descendant (Ray's raylet, workers, actors)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss_pages(pid) for pid in _descendants(os.getpid())) * page)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _meta_chunk(start: int, rows: int, total: int, per_tar: int, seed: int) -> pa.Table:
    """Rows [start, start+rows): random sizes, captions and scores; 5% exact copies (sha256 of another row)."""
    rng = np.random.default_rng([seed, start])
    ids = np.arange(start, start + rows)
    sha = ids.copy()
    copies = rng.random(rows) < 0.05
    sha[copies] = rng.integers(0, total, copies.sum())
    w, h = rng.integers(16, 1024, rows), rng.integers(16, 1024, rows)
    words = rng.integers(0, 30, rows)
    return pa.table(
        {
            "key": pa.array(np.char.zfill(ids.astype(str), 9)),
            "shard": pa.array(np.char.add(np.char.zfill((ids // per_tar).astype(str), 5), ".tar")),
            "url": pa.nulls(rows, pa.string()),
            "caption": pa.nulls(rows, pa.string()),
            "sha256": pa.array(np.char.zfill(sha.astype(str), 64)),
            "width": w.astype(np.int32),
            "height": h.astype(np.int32),
            "original_width": w.astype(np.int32),
            "original_height": h.astype(np.int32),
            "aspect_ratio": (np.maximum(w, h) / np.minimum(w, h)).astype(np.float32),
            "caption_chars": (words * 6).astype(np.int32),
            "caption_words": words.astype(np.int32),
            "error": pa.nulls(rows, pa.string()),
            "clip_score": rng.uniform(-0.1, 0.5, rows).astype(np.float32),
        }
    )


def make_meta(folder: str, rows: int, per_tar: int, seed: int = 0) -> None:
    from pipeline.storage import Location, write_manifest

    location = Location(folder)
    location.makedirs()
    files = {}
    for i, start in enumerate(range(0, rows, CHUNK)):
        name = f"{i:05d}.parquet"
        pq.write_table(_meta_chunk(start, min(CHUNK, rows - start), rows, per_tar, seed), location.path(name))
        files[name] = "synthetic"
    write_manifest(location, "annotate", {}, {"samples": rows}, files, time.time())


def _write_tar(job: tuple[str, int, int]) -> None:
    path, start, stop = job
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            data = f"{i}\n".encode()
            info = tarfile.TarInfo(f"{i:09d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_raw(folder: str, rows: int, per_tar: int) -> None:
    """Raw tars with one tiny member per row: the shard stage's cost is per member, not per byte."""
    os.makedirs(folder, exist_ok=True)
    jobs = [
        (os.path.join(folder, f"{s // per_tar:05d}.tar"), s, min(s + per_tar, rows)) for s in range(0, rows, per_tar)
    ]
    with Pool(2) as pool:
        pool.map(_write_tar, jobs, chunksize=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--per-tar", type=int, default=10_000, help="rows per raw tar")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "curate_scale"))
    parser.add_argument("--stages", default="filter,shard", help="filter, or filter,shard (raw tars are made for it)")
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    from pipeline.filter.run import filter_samples
    from pipeline.shard.run import shard

    shutil.rmtree(args.out, ignore_errors=True)
    meta, raw = os.path.join(args.out, "meta"), os.path.join(args.out, "raw")
    selection, shards = os.path.join(args.out, "selection"), os.path.join(args.out, "shards")
    started = time.time()
    make_meta(meta, args.rows, args.per_tar)
    if "shard" in stages:
        make_raw(raw, args.rows, args.per_tar)
    print(
        f"made {args.rows:,} metadata rows (and raw tars for the shard stage) in {time.time() - started:.0f} s",
        flush=True,
    )

    table = []
    started = time.time()
    with PeakMemory() as peak:
        manifest = filter_samples(
            config("filtering", f"input={meta}", f"output={selection}", "tracking=false", "filter.near_duplicate=null")
        )
    took = time.time() - started
    table.append(("filter (basic, no near-dup)", args.rows, took, peak.peak, f"kept {manifest['counts']['kept']:,}"))
    if "shard" in stages:
        started = time.time()
        with PeakMemory() as peak:
            manifest = shard(
                config("shard", f"input={raw}", f"selection={selection}", f"output={shards}", "progress=false")
            )
        took = time.time() - started
        table.append(
            (
                "shard (10,000 per tar)",
                manifest["counts"]["samples"],
                took,
                peak.peak,
                f"{manifest['counts']['shards']:,} tars",
            )
        )

    print("\n| stage | rows | seconds | rows/s | peak memory (process tree) | result |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rows, took, mem, result in table:
        print(f"| {name} | {rows:,} | {took:,.0f} | {rows / took:,.0f} | {mem / 2**30:.1f} GiB | {result} |")


if __name__ == "__main__":
    main()
