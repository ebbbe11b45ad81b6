"""Near-duplicate candidates from thumbnails: each view's nearest neighbours among all views (faiss).

A hash threshold cannot see a 10% crop (it moves every edge), so candidates come from a ranking instead: the
`neighbours` most correlated views of every view, whatever their absolute distance, above a loose floor.
The descriptor is a view's 8×8 luma, mean-removed and normalised, so that inner product is the correlation
of two blurred views and brightness or contrast changes do not move it. A crop zooms: so the index holds,
besides each view, its centre with CENTRE_MARGINS cut per side, and every view is queried against all of
them (a 10% crop of a picture meets the picture's centre 80%). Confirmation (confirm.py) decides.
"""

from __future__ import annotations

import numpy as np

from pipeline.thumbnails import VIEWS, Thumbnails

DESCRIPTOR_SIDE = 8
CENTRE_MARGINS = (0.0, 0.05, 0.1)  # index entries per view: the view, and its centre less 5% and 10% per side
EXACT_BELOW = 50_000  # views; above, an inverted-file index (approximate) keeps the search near-linear
QUERY_CHUNK = 65_536
DECODE_CHUNK = 8192  # rows: their float32 views take ~100 MB (65,536 took 1 GB at the peak)


def _pooling(margin: float, n_in: int) -> np.ndarray:
    """(DESCRIPTOR_SIDE, n_in): area averages of DESCRIPTOR_SIDE equal cells of [margin, 1 - margin]."""
    edges = (margin + (1 - 2 * margin) * np.arange(DESCRIPTOR_SIDE + 1) / DESCRIPTOR_SIDE) * n_in
    pixel = np.arange(n_in)
    overlap = np.clip(np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel), 0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def descriptors(blobs: np.ndarray, margins=(0.0,)) -> np.ndarray:
    """(N, 2 * len(margins), 64) float32 for N thumbnails: per row, each view's centre less each margin."""
    out = np.empty((len(blobs), len(VIEWS) * len(margins), DESCRIPTOR_SIDE**2), np.float32)
    for start in range(0, len(blobs), DECODE_CHUNK):  # decoded a chunk at a time: bounded memory
        luma = Thumbnails.decode(blobs[start : start + DECODE_CHUNK]).luma  # (C, 2, 32, 32)
        for m, margin in enumerate(margins):
            pool = _pooling(margin, luma.shape[-1])
            small = (pool @ luma @ pool.T).reshape(len(luma), len(VIEWS), -1)
            small -= small.mean(-1, keepdims=True)
            small /= np.linalg.norm(small, axis=-1, keepdims=True) + 1e-6
            out[start : start + len(luma), m :: len(margins)] = small
    return out


def _index(vectors: np.ndarray, seed: int):
    import faiss

    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    dim = vectors.shape[1]
    if len(vectors) < EXACT_BELOW:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(4 * np.sqrt(len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(len(vectors), min(len(vectors), 40 * lists), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = 16
    index.add(vectors)
    return index


def neighbour_pairs(blobs: np.ndarray, neighbours: int, min_similarity: float, seed: int = 0) -> np.ndarray:
    """(E, 2) row pairs (i < j) where a view of one is among a view of the other's nearest `neighbours`, with a
    correlation of at least `min_similarity`."""
    n = len(blobs)
    if n < 2 or neighbours <= 0:
        return np.zeros((0, 2), np.int64)
    entries = descriptors(blobs, CENTRE_MARGINS)  # (N, E, 64)
    per_row = entries.shape[1]
    index = _index(entries.reshape(-1, entries.shape[2]), seed)
    queries = entries[:, :: len(CENTRE_MARGINS)].reshape(-1, entries.shape[2])  # each whole view
    per_query = len(VIEWS)
    del entries
    k = min(index.ntotal, neighbours + per_row)  # a row's own entries are among its nearest: skip them
    found = []
    for start in range(0, len(queries), QUERY_CHUNK):
        similarity, hits = index.search(queries[start : start + QUERY_CHUNK], k)
        query_rows = (np.arange(start, start + len(hits)) // per_query)[:, None]
        hit_rows = hits // per_row
        keep = (hits >= 0) & (hit_rows != query_rows) & (similarity >= min_similarity)
        a, b = np.broadcast_to(query_rows, hits.shape)[keep], hit_rows[keep]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return np.unique(pairs, axis=0).astype(np.int64)
