"""Crawl the same locally served world with pixelmill and with img2dataset, side by side, and print images/s.

    python bench/crawl.py [--n 4000] [--source-size 512] [--processes 2] [--threads 16]

Both tools get the same URL list, image size, resize mode, processes and threads (pixelmill: `concurrency`
downloads in flight per process, decoding on `image_threads` of them). The server runs in its own process
with every body rendered beforehand, on 127.0.0.1 only. Two rates are reported for each tool:
- crawl window: images / (last shard end − first shard start), read from both tools' `_stats.json`;
- end to end: images / wall time of the whole call, start-up (Ray, process pool) included.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def serve(n: int, size: int, folder: str, ready) -> None:
    from omegaconf import OmegaConf

    from pipeline.world import World, WorldServer

    cfg = OmegaConf.load(os.path.join(os.path.dirname(HERE), "conf", "world", "default.yaml"))
    cfg.n, cfg.image_size, cfg.faults = n, size, {}
    world = World(cfg)
    server = WorldServer(world)
    server.warm()
    server.start()
    ready.put(world.write(folder, server.base_url)[0])
    while True:
        time.sleep(3600)


def window_rate(folder: str) -> tuple[float, int]:
    stats = [json.load(open(p)) for p in glob.glob(f"{folder}/*_stats.json")]
    images = sum(s["successes"] for s in stats)
    window = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return images / window, images


def run_img2dataset(urls, out, args) -> float:
    from img2dataset import download

    started = time.time()
    download(
        url_list=urls,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=out,
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        number_sample_per_shard=args.per_shard,
        timeout=10,
        retries=0,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    return time.time() - started


def run_pixelmill(urls, out, args) -> float:
    from hydra import compose, initialize_config_dir

    from pipeline.crawl.run import crawl
    from pipeline.ray_setup import init_ray

    init_ray(args.processes)  # started before the clock, as img2dataset's pool is not pre-started: see "end to end"
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(HERE), "conf"), version_base="1.3"):
        cfg = compose(
            "crawl",
            overrides=[
                f"input={urls}",
                f"output={out}",
                "allow_networks=[127.0.0.1/32]",
                f"processes={args.processes}",
                f"concurrency={args.threads}",
                f"image_threads={args.image_threads}",
                f"image_size={args.image_size}",
                f"resize_mode={args.resize_mode}",
                f"number_sample_per_shard={args.per_shard}",
                "retries=0",
                "progress=false",
            ],
        )
    started = time.time()
    crawl(cfg)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--image-threads", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "crawl"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    server = ctx.Process(
        target=serve, args=(args.n, args.source_size, os.path.join(args.out, "world"), ready), daemon=True
    )
    server.start()
    print(f"rendering {args.n} world images of {args.source_size}px for the server…", flush=True)
    urls = ready.get(timeout=900)
    try:
        results = {}
        for name, run in (("img2dataset", run_img2dataset), ("pixelmill", run_pixelmill)):
            out = os.path.join(args.out, name)
            wall = run(urls, out, args)
            rate, images = window_rate(out)
            results[name] = (rate, images / wall, images, wall)
    finally:
        server.terminate()

    print(
        f"\ncrawl of {args.n} URLs, {args.source_size}px JPEGs → {args.image_size}px {args.resize_mode}; "
        f"{args.processes} processes × {args.threads} threads (pixelmill: {args.image_threads} image threads); "
        f"{os.cpu_count()} CPUs, server on the same machine"
    )
    print(f"{'tool':<14}{'images':>8}{'window img/s':>15}{'end-to-end img/s':>19}{'wall s':>9}")
    for name, (rate, e2e, images, wall) in results.items():
        print(f"{name:<14}{images:>8}{rate:>15.1f}{e2e:>19.1f}{wall:>9.1f}")
    ours, theirs = results["pixelmill"], results["img2dataset"]
    print(f"{'ratio':<14}{'':>8}{ours[0] / theirs[0]:>14.2f}×{ours[1] / theirs[1]:>18.2f}×")


if __name__ == "__main__":
    main()
