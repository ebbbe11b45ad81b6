"""The crawl stage on a real local Ray against the real world server: every fault ends where it should."""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.crawl.run import crawl
from pipeline.errors import StageError
from support import ROOT, crawl_config, read_rows

IMG2DATASET_FIELDS = {
    "url",
    "caption",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
}


@pytest.fixture(scope="module")
def crawled(ray_local, world_lists, tmp_path_factory, world_server):
    output = tmp_path_factory.mktemp("raw")
    manifest = crawl(crawl_config(f"input={world_lists[0]}", f"output={output}"))
    truth = pq.read_table(world_lists[1]).to_pylist()
    return output, manifest, truth


def test_every_row_ends_as_the_ground_truth_says(crawled):
    output, manifest, truth = crawled
    rows = read_rows(output)
    assert [r["url"] for r in rows] == [t["url"] for t in truth]  # one row per input row, in input order
    wrong = [
        (t["row"], t["fault"], (t["expected_status"], t["expected_reason"]), (r["status"], r["reason"]))
        for t, r in zip(truth, rows)
        if (r["status"], r["reason"]) != (t["expected_status"], t["expected_reason"])
    ]
    assert wrong == []
    faults = {t["fault"] for t in truth}
    assert len(faults) >= 20  # every fault of the world was exercised


def test_nothing_is_lost(crawled):
    output, manifest, truth = crawled
    counts = manifest["counts"]
    assert counts["rows"] == len(truth)
    assert counts["success"] + counts["failed_to_download"] + counts["failed_to_resize"] + counts["duplicate"] == len(
        truth
    )
    expected = collections.Counter(t["expected_status"] for t in truth)
    assert {s: counts[s] for s in expected} == dict(expected)
    by_reason = collections.Counter(t["expected_reason"] for t in truth if t["expected_reason"])
    flat = {reason: n for reasons in counts["reasons"].values() for reason, n in reasons.items()}
    assert flat == dict(by_reason)


def test_tars_are_webdataset_and_img2dataset_shaped(crawled):
    output, manifest, truth = crawled
    rows = {r["key"]: r for r in read_rows(output)}
    tars = sorted(glob.glob(f"{output}/*.tar"))
    assert [os.path.basename(t) for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    successes = {k for k, r in rows.items() if r["status"] == "success"}
    assert {s[0] for s in samples} == successes and len(samples) == len(successes)
    for key, image, caption, meta in samples:
        assert image.size == (64, 64)
        assert caption == rows[key]["caption"]
        assert IMG2DATASET_FIELDS <= set(meta)
        assert meta["key"] == key and meta["status"] == "success"
    # Every parquet row carries img2dataset's columns; failures say why.
    assert IMG2DATASET_FIELDS <= set(pq.read_schema(f"{output}/00000.parquet").names)
    for r in rows.values():
        assert (r["error_message"] is None) == (r["status"] == "success")
    stats = json.load(open(f"{output}/00000_stats.json"))
    assert {"count", "successes", "failed_to_download", "failed_to_resize", "status_dict", "duration"} <= set(stats)


def test_duplicates_and_opt_outs(crawled, world_server):
    output, manifest, truth = crawled
    rows = read_rows(output)
    for t, r in zip(truth, rows):
        if t["fault"] == "duplicate_image":
            assert r["sha256"] == rows[t["source_row"]]["sha256"]
        if t["fault"] == "duplicate_url":
            assert r["error_message"] == f"duplicate of key {rows[t['source_row']]['key']}"
            path = "/" + t["url"].split("/", 3)[3]
            assert world_server.requests[path] == 1  # fetched once, for its first occurrence
        if t["fault"] == "opt_out":
            assert r["error_message"].startswith("X-Robots-Tag: no")


def test_the_crawler_says_who_it_is(crawled, world_server):
    agents = [ua for ua in world_server.user_agents if ua.startswith("pixelmill/")]
    assert agents and "X-Robots-Tag" in agents[0]


def test_a_finished_crawl_is_not_redone(crawled, world_lists, capsys):
    output, manifest, truth = crawled
    again = crawl(crawl_config(f"input={world_lists[0]}", f"output={output}"))
    assert again["content_hash"] == manifest["content_hash"]
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(StageError, match="another input or config"):
        crawl(crawl_config(f"input={world_lists[0]}", f"output={output}", "image_size=32"))


def test_the_guard_holds_on_ray_workers(ray_local, world_lists, world_server, tmp_path):
    """With loopback not allowed, every row is refused and the server, on loopback, sees no request at all."""
    before = sum(world_server.requests.values())
    manifest = crawl(crawl_config(f"input={world_lists[0]}", f"output={tmp_path}", "allow_networks=[]"))
    counts = manifest["counts"]
    assert counts["reasons"]["failed_to_download"]["blocked_address"] == counts["rows"] - counts["duplicate"]
    assert sum(world_server.requests.values()) == before


def test_extra_columns_folder_input_and_formats(ray_local, world, world_server, tmp_path):
    base = world_server.base_url
    clean = [r["row"] for r in world.rows if r["fault"] == "none"][:3]
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        "".join(
            json.dumps({"url": f"{base}/img/{i}.jpg", "caption": f"c{i}", "source": "world", "rank": i}) + "\n"
            for i in clean
        )
    )
    out = tmp_path / "out"
    crawl(crawl_config(f"input={listing}", f"output={out}", "resize_mode=center_crop", "encode_format=png"))
    rows = read_rows(out)
    assert [(r["source"], r["rank"], r["status"]) for r in rows] == [("world", i, "success") for i in clean]
    [(meta, image)] = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).to_tuple("json", "png"))[:1]
    assert json.loads(meta)["source"] == "world" and Image.open(io.BytesIO(image)).format == "PNG"
    # A folder of images with sidecar captions goes through the same stage.
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in clean:
        (folder / f"{i}.jpg").write_bytes(world.body(i))
        (folder / f"{i}.txt").write_text(world.rows[i]["caption"])
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    manifest = crawl(crawl_config(f"input={folder}", f"output={tmp_path / 'from_folder'}"))
    assert manifest["counts"]["success"] == 3
    assert manifest["counts"]["reasons"] == {"failed_to_resize": {"not_an_image": 1}}


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.crawl", f"input={tmp_path}/missing.parquet", f"output={tmp_path}/out"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: input {tmp_path}/missing.parquet does not exist"


def test_manifest_hashes_are_those_of_the_files(crawled):
    output, manifest, truth = crawled
    assert manifest["outputs"] == sorted(
        os.path.basename(p) for p in glob.glob(f"{output}/0*.tar") + glob.glob(f"{output}/0*.parquet")
    )
    stats = json.load(open(f"{output}/00000_stats.json"))
    for name, digest in stats["sha256"].items():
        assert hashlib.sha256(open(f"{output}/{name}", "rb").read()).hexdigest() == digest
