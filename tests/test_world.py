"""The embedded world: deterministic, with ground truth that matches what its pixels and server do."""

from __future__ import annotations

import collections
import io
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.world import World
from pipeline.world.world import BOMB_SIDE, EXPECTED
from support import world_config


def test_same_config_same_rows_and_bytes():
    a, b = World(world_config()), World(world_config())
    assert a.rows == b.rows
    assert all(a.body(i) == b.body(i) for i in range(0, a.n, 7))
    c = World(world_config(seed=1))
    assert c.rows != a.rows


def test_every_fault_has_a_row_and_sources_are_clean_and_earlier(world):
    faults = collections.Counter(r["fault"] for r in world.rows)
    assert set(faults) == set(EXPECTED)  # every fault, and clean rows
    for row in world.rows:
        if row["source_row"] is not None:
            source = world.rows[row["source_row"]]
            assert source["fault"] == "none" and source["row"] < row["row"]


def test_captions_name_what_is_drawn(world):
    """The shape colour named in a clean caption is the dominant saturated colour of its pixels."""
    palette = {name: np.array(rgb) for name, rgb in world.vocab.colours.items()}
    checked = 0
    for row in world.rows:
        if row["fault"] != "none" or row["kind"] != "group":
            continue
        assert row["colour"] in row["caption"] and (row["shape"] in row["caption"])
        pixels = np.asarray(Image.open(io.BytesIO(world.body(row["row"]))).convert("RGB")).reshape(-1, 3).astype(int)
        nearest = {name: np.sum(np.abs(pixels - rgb).sum(axis=1) < 60) for name, rgb in palette.items()}
        assert max(nearest, key=nearest.get) == row["colour"]
        checked += 1
    assert checked > 30


def test_mismatched_captions_differ_in_shape_and_colour(world):
    mismatched = [r for r in world.rows if r["fault"] == "caption_mismatch"]
    assert mismatched
    for r in mismatched:
        assert not r["caption_matches"]
        assert f"{r['colour']} {r['shape']}" not in r["caption"]


def test_fault_bodies(world):
    first = {r["fault"]: r["row"] for r in reversed(world.rows)}
    data = world.body(first["bomb"])
    assert len(data) < 20_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    Image.MAX_IMAGE_PIXELS, old = None, Image.MAX_IMAGE_PIXELS
    try:
        assert Image.open(io.BytesIO(data)).size == (BOMB_SIDE, BOMB_SIDE)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    for fault in ("truncated", "corrupt"):
        image = Image.open(io.BytesIO(world.body(first[fault])))
        with pytest.raises(OSError):
            image.load()
    dup = world.rows[first["duplicate_image"]]
    assert world.body(dup["row"]) == world.body(dup["source_row"])
    near = world.rows[first["near_duplicate"]]
    assert world.body(near["row"]) != world.body(near["source_row"])


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), b""


def test_server_serves_faults_and_counts_requests(world, world_server, world_lists):
    truth = pq.read_table(world_lists[1]).to_pylist()
    by_fault = {}
    for r in truth:
        by_fault.setdefault(r["fault"], r)
    path = "/" + by_fault["http_404"]["url"].split("/", 3)[3]
    before = world_server.requests[path]
    assert _get(by_fault["http_404"]["url"])[0] == 404
    assert _get(by_fault["http_500"]["url"])[0] == 500
    status, headers, body = _get(by_fault["opt_out"]["url"])
    assert status == 200 and "X-Robots-Tag" in headers
    status, _, body = _get(by_fault["redirect"]["url"])  # urllib follows the redirect
    assert status == 200 and body == world.body(by_fault["redirect"]["row"])
    status, headers, _ = _get(by_fault["fake_image"]["url"])
    assert headers["Content-Type"] == "image/jpeg"
    assert world_server.requests[path] == before + 1
