"""The near rule's candidate search: the inverted file used above EXACT_BELOW entries finds what the exact
search finds, and filling and querying it a chunk of rows at a time changes nothing."""

import importlib.util
from pathlib import Path

import numpy as np

import pipeline.filter.candidates as candidates

SCALE_BENCH = Path(__file__).parents[1] / "bench" / "dedup_scale.py"


def planted_rows(rows: int, copies: int):
    """The scale bench's synthetic thumbnails (smooth random fields), `copies` of them altered copies."""
    spec = importlib.util.spec_from_file_location("dedup_scale", SCALE_BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    blobs = np.array([b.tobytes() for b in bench.thumbnails(rng, rows, 16)], dtype=object)
    sources, targets = rng.choice(rows, (2, copies), replace=False)
    for source, target in zip(sources.tolist(), targets.tolist()):
        blobs[target] = bench.alter_thumbnail(rng, blobs[source])
    return blobs, {(min(s, t), max(s, t)) for s, t in zip(sources.tolist(), targets.tolist())}


def test_the_inverted_file_finds_the_exact_searchs_pairs_in_chunks(monkeypatch):
    blobs, planted = planted_rows(3000, 30)
    exact = {tuple(p) for p in candidates.neighbour_pairs(blobs, 10, 0.6).tolist()}
    monkeypatch.setattr(candidates, "ROW_CHUNK", 700)  # filled and queried in five chunks, the last short
    assert {tuple(p) for p in candidates.neighbour_pairs(blobs, 10, 0.6).tolist()} == exact
    monkeypatch.setattr(candidates, "EXACT_BELOW", 1000)  # 18,000 entries: an inverted file of 536 lists
    approximate = {tuple(p) for p in candidates.neighbour_pairs(blobs, 10, 0.6).tolist()}
    print(f"exact {len(exact)} pairs, inverted file {len(approximate)}, in common {len(exact & approximate)}")
    assert planted <= exact and planted <= approximate
    assert len(exact & approximate) >= 0.95 * len(exact)
    assert len(approximate - exact) <= 0.01 * len(exact) + 1  # float16 vectors move a pair across the floor
