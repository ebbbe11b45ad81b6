"""Annotate → filter → shard on the crawled default world, checked against its ground truth and against
CLIPModel computed directly."""

import glob
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.errors import StageError
from pipeline.filter.run import filter_samples
from pipeline.shard.run import shard
from pipeline.tar_io import iter_tar_samples
from pipeline.world.truth import dedup_scores
from support import read_rows, stage_config
from training.clip.model import load_clip


def raw_samples(raw):
    for path in sorted(glob.glob(f"{raw}/*.tar")):
        with open(path, "rb") as f:
            yield from iter_tar_samples(f)


def meta_rows(folder):
    return pq.read_table(sorted(glob.glob(f"{folder}/0*.parquet"))).to_pylist()


def test_annotate_signals_and_clip_scores_match_clipmodel(default_world_raw, annotated, tiny_clip):
    raw, _ = default_world_raw
    meta_dir, manifest = annotated
    rows = {r["key"]: r for r in meta_rows(meta_dir)}
    crawled = [r for r in read_rows(raw) if r["status"] == "success"]
    assert manifest["counts"]["samples"] == len(rows) == len(crawled) == 186
    samples = {s["__key__"]: s for s in raw_samples(raw)}
    keys = sorted(samples)[:24]
    clip = load_clip(tiny_clip)
    images = [Image.open(io.BytesIO(samples[k]["jpg"])).convert("RGB") for k in keys]
    captions = [samples[k]["txt"].decode() for k in keys]
    with torch.no_grad():
        out = clip.model(
            **clip.tokenizer(captions, padding=True, return_tensors="pt"),
            pixel_values=clip.image_processor(images=images, return_tensors="pt")["pixel_values"],
        )
    direct = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    for key, caption, cosine in zip(keys, captions, direct):
        row = rows[key]
        assert row["sha256"] == hashlib.sha256(samples[key]["jpg"]).hexdigest()
        assert (row["width"], row["height"]) == (64, 64)
        assert (row["original_width"], row["original_height"]) == tuple(
            json.loads(samples[key]["json"])[k] for k in ("original_width", "original_height")
        )
        assert row["caption_words"] == len(caption.split()) and row["caption_chars"] == len(caption)
        assert len(row["dhash"]) == 48 and len(row["image_embedding"]) == 32
        assert abs(row["clip_score"] - cosine) <= 1e-3
        emb = np.asarray(row["image_embedding"], np.float32)
        assert abs(np.linalg.norm(emb) - 1) < 1e-2


def test_filter_removes_duplicates_against_ground_truth(default_world_raw, annotated, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    raw, truth = default_world_raw
    meta_dir, _ = annotated
    manifest = filter_samples(stage_config("filtering", f"input={meta_dir}", f"output={tmp_path / 'sel'}"))
    scores = dedup_scores(truth, raw, str(tmp_path / "sel"))
    print(scores)
    assert scores["exact_copies_removed"] == scores["exact_copies"] > 0
    assert scores["near_duplicates"] >= 10
    assert scores["near_duplicate_precision"] >= 0.95 and scores["near_duplicate_recall"] >= 0.95
    counts = manifest["counts"]
    assert counts["rows"] == counts["kept"] + sum(counts["dropped"].values())  # nothing lost
    assert open(tmp_path / "sel" / "funnel.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    import mlflow

    runs = mlflow.search_runs(experiment_names=["pixelmill"])
    assert len(runs) == 1 and runs["metrics.filter.kept"][0] == counts["kept"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs["run_id"][0], "filter")}
    assert {"filter/funnel.png", "filter/funnel.json", "filter/funnel.txt"} <= artifacts
    assert {"filter/pairs_exact_duplicate.png", "filter/pairs_near_duplicate.png"} <= artifacts
    selection = pq.read_table(tmp_path / "sel" / "selection.parquet").to_pylist()
    kept = {s["key"]: s for s in selection if s["keep"]}
    for s in selection:
        if s["reason"] in ("exact_duplicate", "near_duplicate"):
            assert s["duplicate_of"] in kept and kept[s["duplicate_of"]]["group"] == s["group"] is not None


def test_semantic_dedup_reads_annotates_embeddings_and_prints_its_eps_table(annotated, tmp_path, capsys):
    meta_dir, _ = annotated
    manifest = filter_samples(
        stage_config(
            "filtering",
            f"input={meta_dir}",
            f"output={tmp_path}",
            "tracking=false",
            "filter=semantic",
            "filter.clip_score.min=-1",
            "filter.semantic_duplicate.eps=0.02",
        )
    )
    table = json.load(open(tmp_path / "eps_semantic_duplicate.json"))
    assert [row["eps"] for row in table] == sorted(row["eps"] for row in table)
    dropped = [row["dropped"] for row in table]
    assert dropped == sorted(dropped)  # a looser eps never drops fewer rows
    at_002 = next(row["dropped"] for row in table if row["eps"] == 0.02)
    assert manifest["counts"]["dropped"].get("semantic_duplicate", 0) == at_002
    assert open(tmp_path / "eps_semantic_duplicate.txt").read().strip() in capsys.readouterr().out


def test_size_and_caption_rules_drop_exactly_the_violators(annotated, tmp_path):
    meta_dir, _ = annotated
    rows = {r["key"]: r for r in meta_rows(meta_dir)}
    filter_samples(
        stage_config(
            "filtering",
            f"input={meta_dir}",
            f"output={tmp_path}",
            "tracking=false",
            "filter.image_size.min_side=120",
            "filter.caption.min_words=6",
            "filter.caption.max_chars=50",
            "filter.exact_duplicate=null",
            "filter.near_duplicate=null",
        )
    )
    selection = pq.read_table(tmp_path / "selection.parquet").to_pylist()
    for s in selection:
        r = rows[s["key"]]
        small = min(r["original_width"], r["original_height"]) < 120  # the world's resized near-duplicates
        short = r["caption_words"] < 6 or r["caption_chars"] > 50
        assert s["reason"] == ("image_size" if small else "caption" if short else None)
    reasons = [s["reason"] for s in selection]
    assert reasons.count("image_size") > 0 and reasons.count("caption") > 0 and reasons.count(None) > 0


def test_filter_errors_name_the_bad_thing(annotated, tmp_path):
    meta_dir, _ = annotated
    with pytest.raises(StageError, match="no manifest.json"):
        filter_samples(stage_config("filtering", f"input={tmp_path}", f"output={tmp_path / 'x'}"))
    with pytest.raises(StageError, match="top_fraction"):
        filter_samples(
            stage_config(
                "filtering",
                f"input={meta_dir}",
                f"output={tmp_path / 'y'}",
                "filter=clip_score",
                "filter.clip_score.top_fraction=0.5",
                "tracking=false",
            )
        )


def test_shards_are_webdataset_readable_sized_and_deterministic(default_world_raw, annotated, tmp_path):
    import webdataset as wds

    raw, _ = default_world_raw
    meta_dir, _ = annotated
    sel = tmp_path / "sel"
    filter_manifest = filter_samples(stage_config("filtering", f"input={meta_dir}", f"output={sel}", "tracking=false"))
    kept = filter_manifest["counts"]["kept"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = shard(
            stage_config(
                "shard",
                f"input={raw}",
                f"selection={sel}",
                f"output={tmp_path / name}",
                "samples_per_shard=50",
                f"seed={seed}",
                "progress=false",
            )
        )
    sizes = json.load(open(tmp_path / "a" / "sizes.json"))
    assert sum(sizes.values()) == kept and list(sizes.values())[:-1] == [50] * (len(sizes) - 1)
    for tar, n in sizes.items():
        dataset = wds.WebDataset(str(tmp_path / "a" / tar), shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
        pairs = list(dataset)
        assert len(pairs) == n and all(isinstance(t, str) and im.size == (64, 64) for im, t in pairs)
    assert runs["a"]["content_hash"] == runs["b"]["content_hash"] != runs["c"]["content_hash"]
    selected = {s["key"] for s in pq.read_table(sel / "selection.parquet").to_pylist() if s["keep"]}
    written = [s["__key__"] for t in sorted(sizes) for s in iter_tar_samples(open(tmp_path / "a" / t, "rb"))]
    assert sorted(written) == sorted(selected) and written != sorted(written)  # all of them, shuffled
    assert not os.path.exists(tmp_path / "a" / "_work")
