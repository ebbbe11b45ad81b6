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
ENTRIES_PER_ROW = len(VIEWS) * len(CENTRE_MARGINS)  # consecutive in the index: an entry's row is its id // this
EXACT_BELOW = 50_000  # index entries; above, an inverted-file index (approximate) keeps the search near-linear
ROW_CHUNK = 65_536  # rows whose entries are added, or whose views are queried, at a time
LISTS_PER_ROOT, TRAINING_PER_LIST, PROBES = 4, 40, 16  # the inverted file: 4√entries lists, 16 searched
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


def _flat_entries(blobs: np.ndarray) -> np.ndarray:
    """(N * ENTRIES_PER_ROW, 64): the index entries of N rows, a row's own consecutive."""
    return descriptors(blobs, CENTRE_MARGINS).reshape(-1, DESCRIPTOR_SIDE**2)


def _index(blobs: np.ndarray, seed: int):
    """The index of every row's entries, filled a chunk of rows at a time: the descriptors of all rows (1.5 GB
    at a million) are never held at once. Above EXACT_BELOW entries, an inverted file whose vectors are stored
    as float16 (half of IVFFlat's bytes; float16 keeps each value to 1 part in 2,000), its k-means
    trained on a sample of rows."""
    import faiss

    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    dim, entries = DESCRIPTOR_SIDE**2, len(blobs) * ENTRIES_PER_ROW
    if entries < EXACT_BELOW:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = int(LISTS_PER_ROOT * np.sqrt(entries))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        rows = min(len(blobs), -(-TRAINING_PER_LIST * lists // ENTRIES_PER_ROW))
        sample = np.sort(np.random.default_rng(seed).choice(len(blobs), rows, replace=False))
        index.train(_flat_entries(blobs[sample]))
        index.nprobe = PROBES
    for start in range(0, len(blobs), ROW_CHUNK):
        index.add(_flat_entries(blobs[start : start + ROW_CHUNK]))
    return index


def neighbour_pairs(blobs: np.ndarray, neighbours: int, min_similarity: float, seed: int = 0) -> np.ndarray:
    """(E, 2) row pairs (i < j) where a view of one is among a view of the other's nearest `neighbours`, with a
    correlation of at least `min_similarity`."""
    n = len(blobs)
    if n < 2 or neighbours <= 0:
        return np.zeros((0, 2), np.int64)
    index = _index(blobs, seed)
    k = min(index.ntotal, neighbours + ENTRIES_PER_ROW)  # a row's own entries are among its nearest: skip them
    found = []
    for start in range(0, n, ROW_CHUNK):
        queries = descriptors(blobs[start : start + ROW_CHUNK]).reshape(-1, DESCRIPTOR_SIDE**2)  # whole views
        similarity, hits = index.search(queries, k)
        query_rows = (start + np.arange(len(hits)) // len(VIEWS))[:, None]
        hit_rows = hits // ENTRIES_PER_ROW
        keep = (hits >= 0) & (hit_rows != query_rows) & (similarity >= min_similarity)
        a, b = np.broadcast_to(query_rows, hits.shape)[keep], hit_rows[keep]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return np.unique(pairs, axis=0).astype(np.int64)
