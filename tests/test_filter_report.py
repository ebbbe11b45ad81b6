"""The filter's duplicate links (`duplicate_of`, `group`) across chained rules, and its report end to end on a
hand-written metadata folder: pair grids from real thumbnails, SemDeDup's eps table, and both in MLflow."""

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.errors import StageError
from pipeline.filter.pairs import CELL, GRID_PAIRS, HEADER, spread_sample
from pipeline.filter.rules import ClipScore, DuplicateRule, Duplicates, ExactDuplicate
from pipeline.filter.run import apply_rules, filter_samples, read_metadata
from pipeline.filter.semantic import SemanticDuplicate, format_eps_table
from pipeline.storage import Location, content_hash, file_sha256, write_manifest
from pipeline.thumbnails import THUMBNAIL_BYTES, make_thumbnail
from support import stage_config


class SameValue(DuplicateRule):
    """Rows with equal `column` repeat the first alive one; distance: how far apart their `score`s are."""

    def __init__(self, column):
        self.column, self.columns = column, (column,)

    def duplicates(self, meta, alive):
        rows = np.flatnonzero(alive)
        found = Duplicates.from_groups(rows, meta[self.column][rows], len(alive))
        linked = found.of >= 0
        found.distance[linked] = np.abs(meta["clip_score"][linked] - meta["clip_score"][found.of[linked]])
        return found


class LinksToAGoneRow(DuplicateRule):
    def duplicates(self, meta, alive):
        of = np.full(len(alive), -1)
        of[1] = np.flatnonzero(~alive)[0]
        return Duplicates(of)


def chain_meta():
    """Rows 0..9 readable, row 10 unreadable. Exact: 3→1, 6→0, 9→2. Then scene (over 0,1,2,4,5,7,8): 2→0,
    5→0, 8→4, so 9 moves to 0. Then album (over 0,1,4,7): 4→1, so 8 moves to 1."""
    return {
        "key": np.array([f"k{i:02d}" for i in range(11)], dtype=object),
        "error": np.array([None] * 10 + ["broken image"], dtype=object),
        "sha256": np.array(list("abcbdeafgca"), dtype=object),
        "scene": np.array(["s0", "s1", "s0", "s2", "s3", "s0", "s4", "s5", "s3", "s6", "s0"], dtype=object),
        "album": np.array([f"p{i}" for i in range(11)], dtype=object),
        "clip_score": np.array([0.1, 0.5, 0.2, 0.3, 0.9, 0.4, 0.6, 0.7, 0.8, 0.35, 0.0]),
    }


def test_duplicate_links_follow_chains_to_a_kept_row():
    meta = chain_meta()
    meta["album"][4] = "p1"
    rules = [("exact_duplicate", ExactDuplicate()), ("scene", SameValue("scene")), ("album", SameValue("album"))]
    outcome = apply_rules(meta, rules)
    expected = {2: 0, 3: 1, 4: 1, 5: 0, 6: 0, 8: 1, 9: 0}
    assert {i: int(t) for i, t in enumerate(outcome.duplicate_of) if t >= 0} == expected
    assert outcome.reason.tolist() == [
        None, None, "scene", "exact_duplicate", "album", "scene", "exact_duplicate", None, "scene",
        "exact_duplicate", "unreadable_image",
    ]  # fmt: skip
    assert all(outcome.reason[t] is None for t in expected.values())  # every link ends at a kept row
    # One group per repeated row, numbered in key order of those rows; rows in no link are in no group.
    assert outcome.group.tolist() == [0, 1, 0, 1, 1, 0, 0, -1, 1, 0, -1]
    # Each rule's own pairs name the row it kept at the time (9 repeats 2 by bytes), with its distance.
    pairs = {p.rule: p for p in outcome.pairs}
    assert dict(zip(pairs["exact_duplicate"].dropped.tolist(), pairs["exact_duplicate"].kept.tolist())) == {
        3: 1, 6: 0, 9: 2
    }  # fmt: skip
    assert (pairs["exact_duplicate"].distance == 0).all()
    assert dict(zip(pairs["album"].dropped.tolist(), pairs["album"].kept.tolist())) == {4: 1}
    assert pairs["album"].distance.tolist() == pytest.approx([0.4])
    assert [s["dropped"] for s in outcome.funnel] == [0, 1, 3, 3, 1]


def test_a_later_top_fraction_may_drop_a_repeated_row_and_bad_links_are_refused():
    meta = chain_meta()
    rules = [("exact_duplicate", ExactDuplicate()), ("scene", SameValue("scene"))]
    # Alive after dedup: 0, 1, 4, 7; the top half by clip score drops 0 and 1, which others repeat.
    outcome = apply_rules(meta, [*rules, ("clip_score", ClipScore(top_fraction=0.5))])
    assert outcome.reason[[0, 1]].tolist() == ["clip_score", "clip_score"]
    assert {i: int(t) for i, t in enumerate(outcome.duplicate_of) if t >= 0} == {2: 0, 3: 1, 5: 0, 6: 0, 8: 4, 9: 0}
    assert outcome.group.tolist() == [0, 1, 0, 1, 2, 0, 0, -1, 2, 0, -1]
    with pytest.raises(StageError, match="filter.bad: LinksToAGoneRow.duplicates linked a dropped row"):
        apply_rules(meta, [("bad", LinksToAGoneRow())])


def test_pairs_are_spread_from_the_closest_to_the_farthest():
    distance = np.random.default_rng(3).uniform(0, 0.05, 100)
    shown = spread_sample(distance, GRID_PAIRS, seed=0)
    assert len(set(shown.tolist())) == GRID_PAIRS
    assert distance[shown[0]] == distance.min() and distance[shown[-1]] == distance.max()
    assert (np.diff(distance[shown]) > 0).all()
    ties = spread_sample(np.zeros(100), GRID_PAIRS, seed=0)  # exact duplicates: a seeded, spread choice
    assert (ties == spread_sample(np.zeros(100), GRID_PAIRS, seed=0)).all()
    assert not (np.sort(ties) == np.arange(GRID_PAIRS)).all()
    assert (spread_sample(np.array([0.3, 0.1, 0.2])) == [1, 2, 0]).all()


DIM = 32


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _picture(rng):
    image = Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(4, 30, 2))
    draw.ellipse((x, y, x + 24, y + 16), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_metadata(folder, thumbnails=True, seed=0):
    """Annotate-like metadata in two shards, 52 rows: 0..39 distinct; 40..42 byte copies of 0..2; 43..48 near
    copies of 3..8 (embedding cosine 0.99, a dot added); 49 a byte copy of 43; 50 a byte copy of 10 with a
    one-word caption; 51 unreadable."""
    rng = np.random.default_rng(seed)
    n = 52
    pictures = [_picture(rng) for _ in range(40)]
    embedding = np.zeros((n, DIM))
    embedding[:40] = _unit(rng.standard_normal((40, DIM)))
    sha = [f"{i:064x}" for i in range(n)]
    for copy, source in [(40, 0), (41, 1), (42, 2)]:
        pictures.append(pictures[source])
        embedding[copy], sha[copy] = embedding[source], sha[source]
    for i in range(6):
        base = embedding[3 + i]
        noise = rng.standard_normal(DIM)
        noise = _unit(noise - (noise @ base) * base)  # orthogonal to base: the copy is at cosine 0.99 exactly
        embedding[43 + i] = 0.99 * base + np.sqrt(1 - 0.99**2) * noise
        pictures.append(pictures[3 + i].copy())
        ImageDraw.Draw(pictures[-1]).rectangle((2, 2, 5, 5), fill=(255, 255, 255))  # a small dot added
    pictures += [pictures[43], pictures[10], None]
    embedding[49], sha[49] = embedding[43], sha[43]
    embedding[50], sha[50] = embedding[10], sha[10]
    unreadable = np.arange(n) == 51
    words = np.where(np.arange(n) == 50, 1, 4)
    columns = {
        "key": pa.array([f"{'00000' if i < 26 else '00001'}{i:04d}" for i in range(n)]),
        "shard": pa.array(["00000" if i < 26 else "00001" for i in range(n)]),
        "sha256": pa.array([None if u else s for s, u in zip(sha, unreadable)], pa.string()),
        "original_width": pa.array([64] * n, pa.int32(), mask=unreadable),
        "original_height": pa.array([48] * n, pa.int32(), mask=unreadable),
        "aspect_ratio": pa.array([64 / 48] * n, pa.float32(), mask=unreadable),
        "caption_words": pa.array(words, pa.int32()),
        "caption_chars": pa.array(words * 6, pa.int32()),
        "error": pa.array(["cannot identify image" if u else None for u in unreadable], pa.string()),
        # As annotate writes it: float16 elements, null elements (not a null list) for an unreadable image.
        "image_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(embedding.astype(np.float16).reshape(-1), mask=np.repeat(unreadable, DIM)), DIM
        ),
    }
    if thumbnails:
        columns["thumbnail"] = pa.array(
            [make_thumbnail(p) if p else None for p in pictures], pa.binary(THUMBNAIL_BYTES)
        )
    table = pa.table(columns)
    location, hashes = Location(str(folder)), {}
    location.makedirs()
    for shard, rows in (("00000", slice(0, 26)), ("00001", slice(26, n))):
        pq.write_table(table.slice(rows.start, rows.stop - rows.start), str(folder / f"{shard}.parquet"))
        hashes[f"{shard}.parquet"] = file_sha256(location, f"{shard}.parquet")
    write_manifest(location, "annotate", {"input": "hand-written"}, {"samples": n}, hashes, time.time())
    return str(folder)


def filter_config(meta_dir, out, *overrides):
    """The real basic filter, its near_duplicate off (pair grids of exact duplicates), SemDeDup after it over
    one cluster (every pair compared: a planted pair is never split across clusters)."""
    return stage_config(
        "filtering",
        f"input={meta_dir}",
        f"output={out}",
        "filter.near_duplicate=null",
        "+filter.semantic_duplicate={_target_:pipeline.filter.semantic.SemanticDuplicate,eps:0.05,clusters:1}",
        *overrides,
    )


def test_filter_writes_links_pair_grids_and_eps_table_and_logs_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store (./mlruns) lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    meta_dir, out = write_metadata(tmp_path / "meta"), tmp_path / "sel"
    manifest = filter_samples(filter_config(meta_dir, out))

    table = pq.read_table(out / "selection.parquet")
    assert table.schema.names == ["key", "shard", "keep", "reason", "duplicate_of", "group"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "bool", "string", "string", "int64"]
    rows = table.to_pylist()
    by_key = {r["key"]: r for r in rows}
    key = [r["key"] for r in rows]
    reasons = [r["reason"] for r in rows]
    assert reasons[51] == "unreadable_image" and reasons[50] == "caption"
    assert [reasons[i] for i in (40, 41, 42, 49)] == ["exact_duplicate"] * 4
    assert [rows[i]["duplicate_of"] for i in (40, 41, 42)] == key[:3]
    semantic = [i for i, r in enumerate(reasons) if r == "semantic_duplicate"]
    assert sorted(min(i, 40 + i) if i < 40 else i - 40 for i in semantic) == list(range(3, 9))  # one of each pair
    for i in semantic:
        assert rows[i]["duplicate_of"] == key[i + 40 if i < 40 else i - 40]
    assert rows[49]["duplicate_of"] == (key[3] if 43 in semantic else key[43])  # moved on when 43 went
    for r in rows:  # every link names a kept row of the same group; rows in no link are in no group
        if r["duplicate_of"] is not None:
            assert by_key[r["duplicate_of"]]["keep"] and by_key[r["duplicate_of"]]["group"] == r["group"]
    repeated = sorted({r["duplicate_of"] for r in rows if r["duplicate_of"]})
    assert [by_key[k]["group"] for k in repeated] == list(range(len(repeated))) == list(range(9))
    assert all(r["group"] is None for r in rows if r["key"] not in repeated and r["duplicate_of"] is None)
    assert manifest["counts"]["kept"] == 52 - 12 and manifest["counts"]["dropped"]["semantic_duplicate"] == 6

    # Pair grids: 4 exact pairs in one row of the grid, 6 semantic ones in two.
    for rule, pairs in (("exact_duplicate", 4), ("semantic_duplicate", 6)):
        with Image.open(out / f"pairs_{rule}.png") as grid:
            assert grid.size == (4 * CELL[0], (pairs + 3) // 4 * CELL[1] + HEADER)
            colours = np.unique(np.asarray(grid.convert("RGB")).reshape(-1, 3), axis=0)
            assert len(colours) > 50  # the thumbnails, not a blank figure

    # The eps table is the rule's over the rows it saw (those that reached it); its eps=0.05 row is the drops.
    meta = read_metadata(Location(meta_dir), ["key", "image_embedding"])
    saw = np.array([r in (None, "semantic_duplicate") for r in reasons])
    expected = SemanticDuplicate(eps=0.05, clusters=1).eps_table(meta, saw)
    assert json.loads((out / "eps_semantic_duplicate.json").read_text()) == expected
    assert (out / "eps_semantic_duplicate.txt").read_text() == format_eps_table(expected) + "\n"
    assert next(r["dropped"] for r in expected if r["eps"] == 0.05) == 6
    assert format_eps_table(expected) in capsys.readouterr().out

    # The content hash is the selection's alone; the report files are listed with their sha256.
    assert manifest["content_hash"] == content_hash(
        {"selection.parquet": file_sha256(Location(str(out)), "selection.parquet")}
    )
    report = {"funnel.txt", "funnel.png", "pairs_exact_duplicate.png", "pairs_semantic_duplicate.png"}
    assert set(manifest["report"]) == report | {"eps_semantic_duplicate.txt", "eps_semantic_duplicate.json"}
    for name, digest in manifest["report"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("pixelmill").experiment_id])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "filter")}
    assert {f"filter/{name}" for name in manifest["report"]} <= artifacts
    assert run.info.status == "FINISHED" and not (out / "mlflow_journal").exists()  # all sent, journal gone
    logged = client.download_artifacts(run.info.run_id, "filter/eps_semantic_duplicate.json", str(tmp_path / "dl"))
    logged = json.loads(open(logged).read())
    assert logged["columns"] == ["eps", "dropped", "kept_fraction"]
    assert [row[1] for row in logged["data"]] == [r["dropped"] for r in expected]


def test_without_thumbnails_the_grids_are_skipped_with_a_reason(tmp_path, capsys):
    meta_dir, out = write_metadata(tmp_path / "meta", thumbnails=False), tmp_path / "sel"
    out.mkdir()
    (out / "pairs_old_rule.png").write_bytes(b"from an earlier config")
    manifest = filter_samples(filter_config(meta_dir, out, "tracking=false"))
    assert "no pair grids for exact_duplicate, semantic_duplicate: the metadata has no thumbnail column" in (
        capsys.readouterr().out
    )
    assert not list(out.glob("pairs_*")) and (out / "eps_semantic_duplicate.json").exists()
    assert pq.read_table(out / "selection.parquet").column("duplicate_of").null_count == 52 - 10
    assert "pairs_exact_duplicate.png" not in manifest["report"]
