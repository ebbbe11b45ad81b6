"""The crawl against what the web sends: strips, very wide and 16-bit images, real pictures from Debian
packages, file names with `#`, `?` and `%`, and servers whose timings change from one crawl to the next. Every
row ends as a success of the right size or a failure with its reason, and the same outcomes give the same bytes."""

from __future__ import annotations

import glob
import io
import json
import os
import random
import urllib.parse

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.crawl.run import crawl
from pipeline.errors import StageError
from pipeline.storage import Location
from pipeline.tar_io import OrderedSampleWriter, TarSampleWriter, iter_tar_samples
from pipeline.world import World, WorldServer
from support import crawl_config, read_rows, world_config

SIDE = 64  # crawl_config's image_size
ODD = {  # name: (width, height)
    "strip_1x300.png": (1, 300),
    "strip_300x1.png": (300, 1),
    "strip_1x1100.png": (1, 1100),
    "strip_1x100000.png": (1, 100000),
    "wide_70000x4.png": (70000, 4),
    "wide_20000x10.png": (20000, 10),
    "grey16.png": (48, 32),
    "a#b.png": (30, 20),
    "what?.png": (31, 20),
    "50%.png": (32, 20),
    "50%25.png": (33, 20),
}
# What each mode must give for each odd image, encoded as JPEG: (width, height) or a failure's reason.
EXPECTED = {
    "border": {name: (SIDE, SIDE) for name in ODD},
    "center_crop": {name: (SIDE, SIDE) for name in ODD},
    "keep_ratio_largest": {
        "strip_1x300.png": (1, 64),
        "strip_300x1.png": (64, 1),
        "strip_1x1100.png": (1, 64),
        "strip_1x100000.png": (1, 64),
        "wide_70000x4.png": (64, 1),
        "wide_20000x10.png": (64, 1),
        "grey16.png": (64, 43),
        "a#b.png": (64, 43),
        "what?.png": (64, 41),
        "50%.png": (64, 40),
        "50%25.png": (64, 39),
    },
    "keep_ratio": {
        "strip_1x300.png": (64, 19200),
        "strip_300x1.png": (19200, 64),
        "strip_1x1100.png": "encoder_limit",  # 64 × 70,400: over JPEG's 65,500 px per side
        "strip_1x100000.png": "too_many_pixels",  # 64 × 6,400,000: over max_pixels before any resize
        "wide_70000x4.png": "too_many_pixels",
        "wide_20000x10.png": "encoder_limit",  # 128,000 × 64
        "grey16.png": (96, 64),
        "a#b.png": (96, 64),
        "what?.png": (99, 64),
        "50%.png": (102, 64),
        "50%25.png": (106, 64),
    },
    "no": {
        **{name: size for name, size in ODD.items()},
        "strip_1x100000.png": "encoder_limit",
        "wide_70000x4.png": "encoder_limit",
    },
}
# Real pictures shipped by Debian packages (a strip among them), when this machine has them.
DEBIAN = [
    "/usr/share/doc/nodejs/thin-white-stripe.jpg",
    "/usr/share/doc/libpng-dev/examples/pngtest.png",
    "/usr/share/doc/libxslt1-dev/html/Libxslt-Logo-180x168.gif",
    "/usr/share/icons/Adwaita/512x512/places/folder.png",
    "/usr/share/doc/cmake-data/CMakeLogo.gif",
]


def odd_image(name: str) -> bytes:
    width, height = ODD[name]
    if name == "grey16.png":
        image = Image.fromarray(np.full((height, width), 32768, dtype=np.uint16))  # mid grey, 16 bits
    else:
        rng = np.random.default_rng(width * 7 + height)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def odd_server():
    files = {name: odd_image(name) for name in ODD}
    files.update({os.path.basename(p): open(p, "rb").read() for p in DEBIAN if os.path.exists(p)})
    with WorldServer(World(world_config(n=60)), files=files) as server:
        yield server, files


def write_list(folder, server, names) -> str:
    import pyarrow as pa

    urls = [f"{server.base_url}/file/{urllib.parse.quote(name)}" for name in names]
    path = os.path.join(folder, "odd.parquet")
    pq.write_table(pa.table({"url": urls, "caption": list(names)}), path)
    return path


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_odd_images_in_every_resize_mode(ray_local, odd_server, tmp_path, mode):
    server, files = odd_server
    names = sorted(files)
    listing = write_list(tmp_path, server, names)
    out = tmp_path / "raw"
    manifest = crawl(
        crawl_config(f"input={listing}", f"output={out}", f"resize_mode={mode}", "number_sample_per_shard=4")
    )
    rows = {r["caption"]: r for r in read_rows(out)}
    assert manifest["counts"]["rows"] == len(names) == len(rows)  # every row accounted for
    for name, expected in EXPECTED[mode].items():
        row = rows[name]
        if isinstance(expected, str):
            assert (row["status"], row["reason"]) == ("failed_to_resize", expected), (name, row["error_message"])
        else:
            assert (row["status"], (row["width"], row["height"])) == ("success", expected), (name, row["reason"])
            assert (row["original_width"], row["original_height"]) == ODD[name]
    for name in set(names) - set(ODD):  # the real pictures: all successes, of the mode's size
        row = rows[name]
        assert row["status"] == "success", (name, row["reason"], row["error_message"])
        if mode in ("border", "center_crop"):
            assert (row["width"], row["height"]) == (SIDE, SIDE)
    samples = {s["__key__"]: s for t in sorted(glob.glob(f"{out}/*.tar")) for s in iter_tar_samples(open(t, "rb"))}
    grey = np.asarray(Image.open(io.BytesIO(samples[rows["grey16.png"]["key"]]["jpg"])).convert("L"))
    centre = grey[grey.shape[0] // 2 - 2 : grey.shape[0] // 2 + 2, grey.shape[1] // 2 - 2 : grey.shape[1] // 2 + 2]
    assert abs(float(centre.mean()) - 128) < 3  # 16 bits scaled down, not clipped to white
    peak = max(json.load(open(p))["worker_peak_rss_bytes"] for p in glob.glob(f"{out}/*_stats.json"))
    assert peak < 1 << 30, f"a crawl worker peaked at {peak / 2**20:.0f} MiB"


def test_a_folder_with_hash_question_mark_and_percent_names_reads_each_file(ray_local, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    odd_names = ["a#b.png", "what?.png", "50%.png", "50%25.png"]
    for name in odd_names:
        (folder / name).write_bytes(odd_image(name))
        (folder / (name[:-4] + ".txt")).write_text(f"caption of {name}")
    out = tmp_path / "raw"
    crawl(crawl_config(f"input={folder}", f"output={out}", "resize_mode=keep_ratio"))
    rows = read_rows(out)
    assert len(rows) == 4 and all(r["status"] == "success" for r in rows)
    for row in rows:
        name = row["caption"].removeprefix("caption of ")
        assert (row["original_width"], row["original_height"]) == ODD[name]  # its own file, not a neighbour's
        assert urllib.parse.unquote(urllib.parse.urlparse(row["url"]).path) == str(folder / name)


def test_two_crawls_with_other_server_timings_write_the_same_bytes(ray_local, tmp_path):
    world = World(world_config(n=120))
    hashes, tars, port = [], [], 0
    for seed in (1, 2):  # a fresh server on the same port: its flaky URLs fail their first request again
        with WorldServer(world, port=port, jitter=0.15, seed=seed) as server:
            port = server.port
            urls, _ = world.write(tmp_path / "list", server.base_url)
            out = tmp_path / f"raw{seed}"
            manifest = crawl(crawl_config(f"input={urls}", f"output={out}", "concurrency=16", "processes=2"))
        hashes.append(manifest["content_hash"])
        tars.append({os.path.basename(p): open(p, "rb").read() for p in glob.glob(f"{out}/*.tar")})
        keys = [s["__key__"] for t in sorted(tars[-1]) for s in iter_tar_samples(io.BytesIO(tars[-1][t]))]
        assert keys == sorted(keys)  # key order, not completion order
    assert hashes[0] == hashes[1] and tars[0] == tars[1]


def test_samples_come_out_in_position_order_and_spill_past_the_buffer(tmp_path):
    order = list(range(200))
    random.Random(0).shuffle(order)
    writer = OrderedSampleWriter(TarSampleWriter(Location(str(tmp_path)), "x.tar"), buffer_bytes=10_000)
    for position in order:
        sample = None if position % 7 == 0 else {"__key__": f"{position:05d}", "bin": bytes([position % 256]) * 500}
        writer.put(position, sample)
    assert writer.spill is not None  # 200 samples × 500 bytes did not all wait in memory
    writer.close()
    samples = list(wds.WebDataset(str(tmp_path / "x.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{p:05d}" for p in range(200) if p % 7]
    assert all(s["bin"] == bytes([int(s["__key__"]) % 256]) * 500 for s in samples)


@pytest.mark.parametrize(
    "option, message",
    [
        ("number_sample_per_shard=abc", "crawl: number_sample_per_shard='abc'; expected an integer ≥ 1"),
        ("concurrency=0", "crawl: concurrency=0; expected an integer ≥ 1"),
        ("image_threads=-1", "crawl: image_threads=-1; expected an integer ≥ 1"),
        ("processes=0", "crawl: processes=0; expected an integer ≥ 1, or null"),
        ("timeout=0", "crawl: timeout=0; expected a number ≥ 0.001"),
        ("encode_quality=101", "crawl: encode_quality=101; expected an integer from 0 to 100"),
        ("retries=1.5", "crawl: retries=1.5; expected an integer ≥ 0"),
        ("resize_only_if_bigger=maybe", "crawl: resize_only_if_bigger='maybe'; expected true or false"),
    ],
)
def test_bad_options_are_refused_at_start(option, message, tmp_path):
    with pytest.raises(StageError) as err:
        crawl(crawl_config(f"input={tmp_path}/missing.parquet", f"output={tmp_path}/out", option))
    assert str(err.value) == message
    assert not os.path.exists(tmp_path / "out")  # refused before anything was touched
