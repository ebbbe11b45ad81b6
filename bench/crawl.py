"""Crawl real pictures with pixelmill and with img2dataset, cell by cell, and print images/s side by side.

    python bench/crawl.py [--sizes 256,512,1024,2048] [--formats jpg,png,webp]
                          [--modes border,keep_ratio,center_crop] [--servers plain,ours] [--scale 1.0]

A cell is (server, source size, source format, resize mode). Its URLs point at real pictures from Debian
packages (`bench/pictures.py`: clip art on white and wallpapers, short side at the source size, up to 4:3),
served from 127.0.0.1 by a server in its own process: `plain` (Python's ThreadingHTTPServer, HTTP/1.0, a
connection per request) or `ours` (the world's aiohttp server, keep-alive). Both tools run as the whole
command a user types, with their usual settings (2 processes × 16 threads), one after the other on the same
URLs; the output size is 224 px for 256 px sources, 256 for 512 and 1024, 384 for 2048. Two rates per tool:
- end to end: images / wall time of the command, every start-up included (Python, Ray, the process pool);
- window: images / (last shard end − first shard start), read from both tools' `_stats.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# img2dataset imports albumentations, which asks PyPI for a newer version on import: benchmarks talk to
# 127.0.0.1 only (its children, img2dataset's command included, inherit this)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
OUTPUT_SIZE = {256: 224, 512: 256, 1024: 256, 2048: 384}
URLS = {256: 3000, 512: 3000, 1024: 1500, 2048: 600}  # per cell at --scale 1: each run lasts several seconds
PICTURES = {256: 200, 512: 200, 1024: 100, 2048: 50}  # distinct bodies per cell (URLs cycle through them)


def bodies_file(cache: str, size: int, fmt: str) -> str:
    """The cell's encoded bodies, rendered once into the cache (a 2048 px PNG takes a while to encode)."""
    from pictures import load_pictures, source_body

    path = os.path.join(cache, "crawl-bodies", f"{size}_{fmt}_{PICTURES[size]}.pkl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bodies = [source_body(p, size, fmt) for p in load_pictures(cache, PICTURES[size])]
        with open(path + ".tmp", "wb") as f:
            pickle.dump(bodies, f)
        os.replace(path + ".tmp", path)
    return path


def serve_file(kind: str, path: str, n: int, ready) -> None:
    from pictures import serve

    with open(path, "rb") as f:
        serve(kind, pickle.load(f), n, ready)


def window_rate(folder: str) -> tuple[float, int]:
    stats = [json.load(open(p)) for p in glob.glob(f"{folder}/*_stats.json")]
    images = sum(s["successes"] for s in stats)
    window = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return images / window, images


def commands(urls: str, out: str, size: int, mode: str, args) -> dict[str, list[str]]:
    venv_bin = os.path.dirname(sys.executable)
    return {
        "img2dataset": [
            os.path.join(venv_bin, "img2dataset"),
            *("--url_list", urls, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption"),
            *("--output_format", "webdataset", "--output_folder", f"{out}/img2dataset"),
            *("--processes_count", str(args.processes), "--thread_count", str(args.threads)),
            *("--image_size", str(size), "--resize_mode", mode, "--number_sample_per_shard", "500"),
            *("--timeout", "10", "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"),
        ],
        "pixelmill": [
            sys.executable,
            *("-m", "pipeline.crawl", f"input={urls}", f"output={out}/pixelmill", "allow_networks=[127.0.0.1/32]"),
            *(f"processes={args.processes}", f"concurrency={args.threads}", f"image_size={size}"),
            *(f"resize_mode={mode}", "number_sample_per_shard=500", "retries=0", "progress=false"),
            f"hydra.run.dir={out}/hydra",
        ],
    }


def run_cell(server: str, size: int, fmt: str, modes: list[str], args) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = max(100, int(URLS[size] * args.scale))
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    process = ctx.Process(target=serve_file, args=(server, bodies_file(args.cache, size, fmt), n, ready), daemon=True)
    process.start()
    rows = []
    try:
        base = ready.get(timeout=600)
        cell = os.path.join(args.out, f"{server}_{size}_{fmt}")
        os.makedirs(cell, exist_ok=True)
        urls = os.path.join(cell, "urls.parquet")
        pq.write_table(pa.table({"url": [f"{base}/{i}.img" for i in range(n)], "caption": ["a picture"] * n}), urls)
        for mode in modes:
            out = os.path.join(cell, mode)
            shutil.rmtree(out, ignore_errors=True)
            row = {"server": server, "size": size, "format": fmt, "mode": mode, "urls": n}
            for tool, command in commands(urls, out, OUTPUT_SIZE[size], mode, args).items():
                started = time.time()
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                wall = time.time() - started
                if done.returncode:
                    sys.exit(f"{tool} failed in {out}:\n{done.stderr[-2000:]}")
                window, images = window_rate(f"{out}/{tool}")
                row[tool] = {"images": images, "wall": wall, "end_to_end": images / wall, "window": window}
            rows.append(row)
            print(line(row), flush=True)
    finally:
        process.terminate()
    return rows


def line(row: dict) -> str:
    ours, theirs = row["pixelmill"], row["img2dataset"]
    return (
        f"| {row['server']} | {row['size']} {row['format']} → {OUTPUT_SIZE[row['size']]} {row['mode']} | "
        f"{theirs['end_to_end']:.0f} | {ours['end_to_end']:.0f} | "
        f"**{ours['end_to_end'] / theirs['end_to_end']:.2f}×** | "
        f"{theirs['window']:.0f} | {ours['window']:.0f} | {ours['window'] / theirs['window']:.2f}× |"
    )


def main() -> None:
    from pictures import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--formats", default="jpg,png,webp")
    parser.add_argument("--modes", default="border,keep_ratio,center_crop")
    parser.add_argument("--servers", default="plain,ours")
    parser.add_argument("--scale", type=float, default=1.0, help="URLs per cell, relative to the defaults")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "crawl"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(
        f"{os.cpu_count()} CPUs, servers on the same machine; {args.processes} processes × {args.threads} threads\n"
        "| server | cell | img2dataset e2e img/s | pixelmill e2e img/s | e2e ratio | "
        "img2dataset window | pixelmill window | window ratio |\n|---|---|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for server in args.servers.split(","):
        for size in map(int, args.sizes.split(",")):
            for fmt in args.formats.split(","):
                rows += run_cell(server, size, fmt, args.modes.split(","), args)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
