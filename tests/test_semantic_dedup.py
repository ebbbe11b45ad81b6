"""Semantic deduplication on embeddings of known structure: random unit vectors (far apart in 64-d), planted
near copies (cosine 0.995–0.999, duplicates at eps=0.05) and planted medium pairs (cosine 0.9, not)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import StageError
from pipeline.filter.run import build_rules, read_metadata
from pipeline.filter.semantic import EPS_VALUES, SemanticDuplicate, format_eps_table
from pipeline.storage import Location

BASE, NEAR, MEDIUM, DIM = 400, 40, 20, 64


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def at_cosine(rng, base, cosine):
    """A unit vector at exactly `cosine` to unit vector `base`, in a random direction."""
    noise = rng.standard_normal(base.shape)
    noise = unit(noise - (noise @ base) * base)
    return cosine * base + np.sqrt(1 - cosine**2) * noise


def planted(seed=0):
    """Rows 0..399 random; row 400+i a near copy of row i (i < 40); row 440+i a medium pair of row 40+i."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((BASE, DIM)))
    near = [at_cosine(rng, base[i], rng.uniform(0.995, 0.999)) for i in range(NEAR)]
    medium = [at_cosine(rng, base[NEAR + i], 0.9) for i in range(MEDIUM)]
    embeddings = np.concatenate([base, near, medium]).astype(np.float32)
    return {"image_embedding": embeddings, "clip_score": rng.uniform(0.1, 0.4, len(embeddings))}


PARTNER = {**{i: BASE + i for i in range(NEAR)}, **{BASE + i: i for i in range(NEAR)}}


def cosine(meta, a, b):
    x = unit(meta["image_embedding"].astype(np.float64))
    return np.einsum("ij,ij->i", x[a], x[b])


def check_planted_pairs(found, meta):
    """Exactly one row of each near pair is dropped, pointing at its partner, which is kept."""
    dropped = np.flatnonzero(found.of >= 0)
    assert len(dropped) == NEAR
    assert sorted(min(i, PARTNER[i]) for i in dropped.tolist()) == list(range(NEAR))
    assert all(found.of[i] == PARTNER[i] for i in dropped.tolist())
    assert (found.of[found.of[dropped]] == -1).all()  # the rows pointed at are kept
    assert np.isnan(found.distance[found.of < 0]).all()
    assert np.allclose(found.distance[dropped], 1 - cosine(meta, dropped, found.of[dropped]), atol=1e-3)
    return dropped


@pytest.mark.parametrize("keep", ["centroid", "far"])
def test_exactly_the_near_copies_are_dropped_and_point_at_their_kept_partner(keep):
    meta = planted()
    alive = np.ones(len(meta["image_embedding"]), bool)
    rule = SemanticDuplicate(eps=0.05, keep=keep)
    assert rule.columns == ("image_embedding",)
    found = rule.duplicates(meta, alive)
    check_planted_pairs(found, meta)
    assert (rule.drop(meta, alive) == (found.of >= 0)).all()
    # one cluster is the plain SemDeDup definition over all pairs: the same pairs
    check_planted_pairs(SemanticDuplicate(eps=0.05, keep=keep, clusters=1).duplicates(meta, alive), meta)


def test_blocked_comparison_matches_one_block():
    meta = planted(seed=1)
    alive = np.ones(len(meta["image_embedding"]), bool)
    for clusters in (None, 1):
        whole = SemanticDuplicate(clusters=clusters).duplicates(meta, alive)
        blocked = SemanticDuplicate(clusters=clusters, max_cluster=16).duplicates(meta, alive)
        assert (whole.of == blocked.of).all()
        assert np.allclose(whole.distance, blocked.distance, equal_nan=True, atol=1e-6)


def test_keep_score_keeps_the_better_caption_match_and_ties_go_to_the_smaller_key():
    meta = planted()
    alive = np.ones(len(meta["image_embedding"]), bool)
    rule = SemanticDuplicate(keep="score")
    assert rule.columns == ("image_embedding", "clip_score")
    dropped = check_planted_pairs(rule.duplicates(meta, alive), meta)
    score = meta["clip_score"]
    assert all(score[i] < score[PARTNER[i]] for i in dropped.tolist())
    score[:] = 0.25  # all tied: the smaller row of each pair stays
    assert (np.flatnonzero(rule.duplicates(meta, alive).of >= 0) == BASE + np.arange(NEAR)).all()


def test_rows_without_an_embedding_or_not_alive_are_never_dropped_nor_pointed_at():
    meta = planted()
    n = len(meta["image_embedding"])
    meta["image_embedding"][[0, BASE + 1]] = np.nan  # pair 0 loses its original, pair 1 its copy
    alive = np.ones(n, bool)
    alive[2] = False  # pair 2 loses its original to an earlier rule
    found = SemanticDuplicate(clusters=1).duplicates(meta, alive)
    dropped = set(np.flatnonzero(found.of >= 0).tolist())
    assert len(dropped) == NEAR - 3
    assert not dropped & {0, BASE, 1, BASE + 1, 2, BASE + 2}


def test_a_row_whose_only_match_is_dropped_points_along_the_chain_to_a_kept_row():
    # a, b, c on one great circle, 0.97 apart in turn: b repeats a, c repeats b, but c is only 0.88 from a.
    angle = np.arccos(0.97)
    chain = np.stack([np.cos(k * angle) * np.eye(DIM)[0] + np.sin(k * angle) * np.eye(DIM)[1] for k in range(3)])
    rng = np.random.default_rng(2)
    others = unit(rng.standard_normal((30, DIM)))
    meta = {"image_embedding": np.concatenate([chain, others]).astype(np.float32)}
    meta["clip_score"] = np.r_[0.9, 0.8, 0.7, np.zeros(30)]  # keep order a, b, c
    alive = np.ones(33, bool)
    found = SemanticDuplicate(eps=0.05, keep="score", clusters=1).duplicates(meta, alive)
    assert found.of[:3].tolist() == [-1, 0, 0]  # c is dropped (SemDeDup's rule) and points at a, kept
    assert found.distance[2] == pytest.approx(1 - (2 * 0.97**2 - 1), abs=1e-4)
    assert (found.of[3:] == -1).all()


def test_dense_clusters_only_ever_point_at_kept_rows():
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((8, DIM)))
    x = unit(np.repeat(centres, 60, axis=0) + 0.03 * rng.standard_normal((480, DIM)))  # long chains of repeats
    meta = {"image_embedding": x.astype(np.float32)}
    alive = np.ones(480, bool)
    for max_cluster in (7, 4096):
        found = SemanticDuplicate(eps=0.05, max_cluster=max_cluster).duplicates(meta, alive)
        dropped = np.flatnonzero(found.of >= 0)
        assert len(dropped) > 400
        assert (found.of[found.of[dropped]] == -1).all()
        assert np.allclose(found.distance[dropped], 1 - cosine(meta, dropped, found.of[dropped]), atol=1e-3)


def test_eps_table_is_monotone_and_agrees_with_the_rule():
    meta = planted()
    alive = np.ones(len(meta["image_embedding"]), bool)
    rule = SemanticDuplicate(eps=0.05)
    table = rule.eps_table(meta, alive)
    assert [row["eps"] for row in table] == list(EPS_VALUES)
    dropped = [row["dropped"] for row in table]
    assert dropped == sorted(dropped) and dropped[0] == 0
    kept = [row["kept_fraction"] for row in table]
    assert kept == sorted(kept, reverse=True)
    at_rule = next(row for row in table if row["eps"] == 0.05)
    assert at_rule["dropped"] == int(rule.drop(meta, alive).sum()) == NEAR
    assert at_rule["kept_fraction"] == pytest.approx(1 - NEAR / len(alive))
    text = format_eps_table(table).splitlines()
    assert len(text) == len(EPS_VALUES) + 1 and text[0].split() == ["eps", "dropped", "kept", "%"]
    assert text[5].split() == ["0.05", str(NEAR), f"{100 * at_rule['kept_fraction']:.1f}%"]


@pytest.mark.parametrize(
    "options,named",
    [
        ({"eps": 0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"keep": "bogus"}, "keep"),
        ({"clusters": 0}, "clusters"),
        ({"max_cluster": 0}, "max_cluster"),
    ],
)
def test_a_bad_option_is_a_one_line_error_naming_it(options, named):
    with pytest.raises(StageError, match=rf"\b{named}=") as raised:
        SemanticDuplicate(**options)
    assert "\n" not in str(raised.value)
    with pytest.raises(StageError, match="filter.semantic_duplicate"):
        build_rules({"semantic_duplicate": {"_target_": "pipeline.filter.semantic.SemanticDuplicate", **options}})


def write_embeddings(folder, name, keys, rows):
    """A metadata file with a fixed-size float16 image_embedding, a null row written as annotate writes it: a
    list of null values (a null list cannot be read back by pyarrow 25, apache/arrow#35692)."""
    values = EMBEDDINGS[rows].reshape(-1)
    null = np.isin(rows, NULL_ROWS)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values, mask=np.repeat(null, 4)), 4)
    pq.write_table(pa.table({"key": keys, "image_embedding": column}), folder / name)


EMBEDDINGS, NULL_ROWS = np.arange(20, dtype=np.float16).reshape(5, 4), [1]


def test_read_metadata_gives_embeddings_as_float32_rows_with_nan_for_null(tmp_path):
    write_embeddings(tmp_path, "a.parquet", ["k3", "k1", "k4"], [0, 1, 2])
    write_embeddings(tmp_path, "b.parquet", ["k0", "k2"], [3, 4])
    meta = read_metadata(Location(str(tmp_path)), ["key", "image_embedding"])
    got = meta["image_embedding"]
    assert got.dtype == np.float32 and got.shape == (5, 4)
    assert meta["key"].tolist() == ["k0", "k1", "k2", "k3", "k4"]
    assert np.isnan(got[1]).all() and not np.isnan(np.delete(got, 1, axis=0)).any()  # k1's embedding is null
    assert (np.delete(got, 1, axis=0) == EMBEDDINGS[[3, 4, 0, 2]].astype(np.float32)).all()  # k0, k2, k3, k4


def test_annotates_table_with_an_unreadable_image_reads_back_with_a_nan_embedding(tmp_path):
    from pipeline.annotate.run import COLUMNS, to_table

    rows = 3
    part = {name: np.zeros(rows, dtype=object if kind in (pa.string(),) else np.float64) for name, kind in COLUMNS}
    part["key"] = np.array(["k2", "k0", "k1"], dtype=object)
    part["thumbnail"] = np.array([None] * rows, dtype=object)
    part["error"] = np.array([None, "unreadable image: OSError: broken", None], dtype=object)
    part["image_embedding"] = part["text_embedding"] = np.ones((rows, 4), np.float32)
    part["clip_score"] = np.array([0.3, np.nan, 0.2])
    pq.write_table(to_table([part]), tmp_path / "00000.parquet")
    meta = read_metadata(Location(str(tmp_path)), ["key", "image_embedding", "thumbnail"])
    assert meta["key"].tolist() == ["k0", "k1", "k2"]
    assert np.isnan(meta["image_embedding"][0]).all() and (meta["image_embedding"][1:] == 1).all()
