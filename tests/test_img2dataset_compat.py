"""img2dataset and pixelmill crawl the same list: same shard names, same keys for the same URLs, and every
field img2dataset writes is in ours, so tools written for img2dataset's output read ours unchanged."""

from __future__ import annotations

import glob
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.crawl.run import crawl
from pipeline.world import World, WorldServer
from support import crawl_config, world_config


def _tar_names(folder):
    return {os.path.basename(p): sorted(tarfile.open(p).getnames()) for p in glob.glob(f"{folder}/*.tar")}


def _first_json(folder):
    with tarfile.open(sorted(glob.glob(f"{folder}/*.tar"))[0]) as tar:
        name = next(n for n in tar.getnames() if n.endswith(".json"))
        return json.load(tar.extractfile(name))


def test_same_layout_keys_and_fields_as_img2dataset(ray_local, tmp_path):
    from img2dataset import download

    # Faults both tools judge alike (img2dataset does not deduplicate URLs, so no duplicate_url here).
    world = World(world_config(n=60, faults={"http_404": 0.05, "truncated": 0.05, "fake_image": 0.05}))
    with WorldServer(world) as server:
        urls, _ = world.write(tmp_path, server.base_url)
        theirs, ours = tmp_path / "img2dataset", tmp_path / "pixelmill"
        download(
            url_list=urls,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            output_folder=str(theirs),
            processes_count=1,
            thread_count=4,
            image_size=64,
            resize_mode="border",
            number_sample_per_shard=20,
            timeout=2,
            retries=0,
            enable_wandb=False,
            distributor="multiprocessing",
        )
        crawl(crawl_config(f"input={urls}", f"output={ours}", "number_sample_per_shard=20"))

    def rows(folder):
        table = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(f"{folder}/0*.parquet"))])
        return {r["key"]: r for r in table.to_pylist()}

    mine, reference = rows(ours), rows(theirs)
    assert sorted(mine) == sorted(reference)  # the same keys...
    assert all(mine[k]["url"] == reference[k]["url"] for k in mine)  # ...for the same URLs
    assert all(mine[k]["status"] == reference[k]["status"] for k in mine)
    assert set(pq.read_schema(f"{theirs}/00000.parquet").names) <= set(pq.read_schema(f"{ours}/00000.parquet").names)
    assert _tar_names(ours) == _tar_names(theirs)  # same shard files holding the same member names
    assert set(_first_json(theirs)) <= set(_first_json(ours))
    their_stats = json.load(open(f"{theirs}/00000_stats.json"))
    our_stats = json.load(open(f"{ours}/00000_stats.json"))
    assert set(their_stats) - {"config"} <= set(our_stats)
