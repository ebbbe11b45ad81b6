"""Plan synthetic URL lists of growing size and print time, rows/s and the planning process's peak RSS.

    python bench/crawl_plan.py [--sizes 1000000,10000000] [--per-shard 10000] [--repeat 0.1]

Each list is a parquet file written in batches: a URL, a caption and a float `score`; a fraction `--repeat`
of the rows repeat the URL of a uniformly drawn earlier row, so most repeats lie far from their first
occurrence (other batches, other shards, other windows). Each planning (`open_input` + `write_plan` into a
fresh output, as the crawl's driver does) runs in its own subprocess, which reports its own peak RSS
(VmHWM, imports included; the peak right after the imports is shown apart). Exactness is checked after
the clock: every plan row's `duplicate_of` is compared with the first row the generator knows for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

GENERATE_BATCH = 1 << 20


def generate(path: str, n: int, repeat: float, seed: int = 0) -> np.ndarray:
    """Write the list; return each row's expected first row (-1 for first occurrences)."""
    rng = np.random.default_rng(seed)
    expected = np.full(n, -1, np.int64)
    first_row = np.zeros(0, np.int64)  # row of each distinct URL id, ids in order of appearance
    distinct = 0
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("score", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, GENERATE_BATCH):
            rows = np.arange(start, min(n, start + GENERATE_BATCH))
            again = rng.random(len(rows)) < repeat
            again[rows == 0] = False
            fresh = ~again
            ids = np.empty(len(rows), np.int64)
            ids[fresh] = distinct + np.arange(fresh.sum())
            before = distinct + np.cumsum(fresh) - fresh  # distinct URLs that exist before each row
            ids[again] = rng.integers(0, before[again])  # uniform over every earlier URL: mostly far back
            first_row = np.concatenate([first_row, rows[fresh]])
            distinct += int(fresh.sum())
            expected[rows[again]] = first_row[ids[again]]
            text = pa.array(ids).cast(pa.string())
            host = pa.array(ids % 50).cast(pa.string())
            url = pc.binary_join_element_wise("https://cdn", host, ".example.com/images/", text, "/full.jpg?w=640", "")
            caption = pc.binary_join_element_wise("a photo, number ", text, "")
            score = pa.array(rng.random(len(rows)).astype(np.float32))
            writer.write_batch(pa.record_batch([url, caption, score], schema=schema), row_group_size=1 << 17)
    return expected


def child(list_path: str, out: str, per: int) -> None:
    """The measured process: open, plan, report (JSON on stdout)."""
    from pipeline.crawl.inputs import open_input
    from pipeline.crawl.planning import write_plan
    from pipeline.storage import Location

    imports_rss = _rss_mb()
    started = time.time()
    urls = open_input(list_path)
    work = Location(os.path.join(out, "_work"))
    work.makedirs()
    counts = write_plan(urls.batches(), per, work, work.path("spill"))
    seconds = time.time() - started
    print(json.dumps({**counts, "seconds": seconds, "peak_rss_mb": _rss_mb(), "imports_rss_mb": imports_rss}))


def _rss_mb() -> float:
    """This process's peak RSS: VmHWM, not ru_maxrss, which keeps the parent's RSS at fork across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def check(out: str, expected: np.ndarray, per: int, shards: int) -> int:
    """Rows whose duplicate_of is not the key of the row the generator knows as its URL's first (0: exact)."""
    from pipeline.crawl.inputs import key_digits

    digits, wrong, start = key_digits(per), 0, 0
    for shard in range(shards):
        keys = pq.read_table(os.path.join(out, "_work", f"{shard:05d}.parquet"), columns=["duplicate_of"])
        values = pc.fill_null(pc.cast(keys["duplicate_of"], pa.int64()), -1).to_numpy()
        got = np.where(values >= 0, values // 10**digits * per + values % 10**digits, -1)
        wrong += int((got != expected[start : start + len(got)]).sum())
        start += len(got)
    return wrong + abs(start - len(expected))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--per-shard", type=int, default=10000)
    parser.add_argument("--repeat", type=float, default=0.1)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "crawl_plan"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.per_shard)
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        shutil.rmtree(args.out, ignore_errors=True)
        os.makedirs(args.out)
        list_path, out = os.path.join(args.out, "list.parquet"), os.path.join(args.out, "plan")
        print(f"generating {n} rows…", flush=True)
        expected = generate(list_path, n, args.repeat)
        command = [sys.executable, __file__, "--child", list_path, out, "--per-shard", str(args.per_shard)]
        report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        wrong = check(out, expected, args.per_shard, report["shards"])
        duplicates = int((expected >= 0).sum())
        results.append({**report, "expected_duplicates": duplicates, "wrong": wrong})
        print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(args.out, ignore_errors=True)

    print(f"\nplanning, {args.per_shard} rows a shard, {args.repeat:.0%} repeated URLs; {os.cpu_count()} CPUs")
    print(f"{'rows':>12}{'seconds':>9}{'rows/s':>11}{'peak RSS MB':>13}{'after imports':>15}{'repeats':>10}  exact")
    for r in results:
        exact = "yes" if r["wrong"] == 0 and r["duplicates"] == r["expected_duplicates"] else f"NO ({r['wrong']})"
        print(
            f"{r['rows']:>12}{r['seconds']:>9.1f}{r['rows'] / r['seconds']:>11.0f}{r['peak_rss_mb']:>13.0f}"
            f"{r['imports_rss_mb']:>15.0f}{r['duplicates']:>10}  {exact}"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        ratio = last["peak_rss_mb"] / first["peak_rss_mb"]
        print(f"peak RSS at {last['rows']} rows / at {first['rows']} rows: ×{ratio:.2f}")


if __name__ == "__main__":
    main()
