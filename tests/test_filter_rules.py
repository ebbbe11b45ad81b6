"""Filter rules on hand-made metadata: each drops exactly the rows that break it, deterministically."""

import numpy as np
import pytest

from pipeline.errors import StageError
from pipeline.filter.near_duplicates import hash_pairs, hashes_to_words, star_groups
from pipeline.filter.rules import AspectRatio, CaptionLength, ClipScore, ExactDuplicate, ImageSize
from pipeline.filter.run import apply_rules, build_rules


def meta_table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(20, 400, n).astype(float)
    h = rng.integers(20, 400, n).astype(float)
    words = rng.integers(0, 12, n).astype(float)
    return {
        "key": np.array([f"{i:06d}" for i in range(n)], dtype=object),
        "error": np.array([None] * n, dtype=object),
        "original_width": w,
        "original_height": h,
        "aspect_ratio": np.maximum(w, h) / np.minimum(w, h),
        "caption_words": words,
        "caption_chars": words * 5 + rng.integers(0, 5, n),
        "clip_score": rng.uniform(-0.2, 0.5, n),
        "sha256": np.array([f"h{i % 150}" for i in range(n)], dtype=object),
    }


def test_row_rules_drop_exactly_the_rows_that_break_them():
    meta = meta_table()
    alive = np.ones(200, bool)
    side = np.minimum(meta["original_width"], meta["original_height"])
    assert (ImageSize(min_side=100).drop(meta, alive) == (side < 100)).all()
    longest = np.maximum(meta["original_width"], meta["original_height"])
    assert (ImageSize(max_side=300).drop(meta, alive) == (longest > 300)).all()
    assert (AspectRatio(max=3.0).drop(meta, alive) == (meta["aspect_ratio"] > 3)).all()
    words, chars = meta["caption_words"], meta["caption_chars"]
    expected = (words < 3) | (words > 9) | (chars < 12)
    assert (CaptionLength(min_words=3, max_words=9, min_chars=12).drop(meta, alive) == expected).all()
    # a rule never drops a row that is already gone
    some = alive.copy()
    some[:100] = False
    assert not ImageSize(min_side=100).drop(meta, some)[:100].any()


def test_clip_score_threshold_and_top_fraction():
    meta = meta_table()
    alive = np.ones(200, bool)
    assert (ClipScore(min=0.2).drop(meta, alive) == (meta["clip_score"] < 0.2)).all()
    dropped = ClipScore(top_fraction=0.25).drop(meta, alive)
    kept = meta["clip_score"][~dropped]
    assert len(kept) == 50 and kept.min() >= meta["clip_score"][dropped].max()
    with pytest.raises(StageError, match="exactly one of min"):
        ClipScore(min=0.1, top_fraction=0.3)


def test_exact_duplicates_keep_the_first_key_and_rules_run_rows_first():
    meta = meta_table()
    dropped = ExactDuplicate().drop(meta, np.ones(200, bool))
    assert dropped.sum() == 50 and not dropped[:150].any()  # rows 150..199 repeat rows 0..49
    rules = build_rules(
        {
            "dedup": {"_target_": "pipeline.filter.rules.ExactDuplicate"},
            "size": {"_target_": "pipeline.filter.rules.ImageSize", "min_side": 100},
            "off": None,
        }
    )
    assert [name for name, _ in rules] == ["size", "dedup"]  # row rules before set rules
    outcome = apply_rules(meta, rules)
    reason, funnel = outcome.reason, outcome.funnel
    assert funnel[-1]["left"] == (reason == None).sum()  # noqa: E711
    assert sum(s["dropped"] for s in funnel) + funnel[-1]["left"] == 200  # nothing lost
    with pytest.raises(StageError, match="filter.size"):
        build_rules({"size": {"_target_": "pipeline.filter.rules.ClipScore"}})


def _planted(n, dups, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 256, (n, 24), dtype=np.uint8)
    for i in range(dups):
        h[n - 1 - i] = h[i]
        for bit in rng.choice(192, size=int(rng.integers(0, 16)), replace=False):
            h[n - 1 - i, bit // 8] ^= 1 << (bit % 8)
    return np.array([bytes(r).hex() for r in h], dtype=object)


def test_hash_pairs_lsh_matches_exact_search():
    hashes = _planted(3000, 150)
    exact = {tuple(sorted(p)) for p in hash_pairs(hashes, 20, exact_below=10**9).tolist()}
    lsh = {tuple(sorted(p)) for p in hash_pairs(hashes, 20, exact_below=0).tolist()}
    assert len(exact) == 150  # the planted copies, each with its original, and nothing else
    assert exact == {(i, 3000 - 1 - i) for i in range(150)}
    assert lsh == exact
    words = hashes_to_words(list(hashes[:2]))
    assert words.shape == (2, 3)


def test_star_groups_do_not_chain():
    # 0~1 and 1~2: 2 was confirmed only against 1, so it keeps a row of its own; 3~4 closer than 3~5
    keeper, distance = star_groups(np.array([[0, 1], [1, 2], [3, 5], [3, 4]]), np.array([0.1, 0.1, 0.3, 0.2]), 6)
    assert keeper.tolist() == [0, 0, 2, 3, 3, 3]
    assert distance.tolist() == [0, 0.1, 0, 0, 0.2, 0.3]


def test_text_columns_read_back_as_compact_strings_and_rows_without_a_hash_repeat_nothing(tmp_path):
    """Text is numpy's StringDType in key order across files and pieces (null → None), not an object array
    of str (at 10M rows those were most of the filter's memory); a row with no sha256 is no exact duplicate."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.filter import rules
    from pipeline.filter.run import read_metadata
    from pipeline.storage import Location

    pq.write_table(pa.table({"key": ["k3", "k1", "k4"], "sha256": ["a", None, "a"], "error": [None, "bad", None]}),
                   tmp_path / "a.parquet")  # fmt: skip
    pq.write_table(
        pa.table({"key": ["k0", "k2"], "sha256": ["b", None], "error": [None, None]}), tmp_path / "b.parquet"
    )
    meta = read_metadata(Location(str(tmp_path)), ["key", "sha256", "error"])
    assert meta["key"].dtype == meta["sha256"].dtype == np.dtypes.StringDType(na_object=None)
    assert meta["key"].tolist() == ["k0", "k1", "k2", "k3", "k4"]
    assert meta["sha256"].tolist() == ["b", None, None, "a", "a"]
    assert rules.present(meta["error"]).tolist() == [False, True, False, False, False]
    assert rules.text_to_arrow(meta["key"]).to_pylist() == ["k0", "k1", "k2", "k3", "k4"]
    found = ExactDuplicate().duplicates(meta, np.ones(5, bool))
    assert found.of.tolist() == [-1, -1, -1, -1, 3]  # k4 repeats k3; k1 and k2 (no hash) repeat nothing
