"""Groups of near-duplicate images from their perceptual hashes (Hamming distance ≤ t).

Small sets are compared exhaustively. Large ones use locality-sensitive hashing by bit sampling: each of
`tables` tables keys a hash by `bits_per_table` of its bits chosen at random (seeded); two hashes d bits
apart share a key with probability (1 - d/B)^k, so close pairs meet in some table almost surely while far
pairs almost never do. Every candidate pair is then checked exactly: an edge always means distance ≤ t, and
groups are the connected components of those edges.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MAX_RUN_OFFSET = 256  # in a table, a row is compared with at most this many rows sharing its key


def hashes_to_words(hex_hashes) -> np.ndarray:
    """Hex strings of equal length → (N, W) uint64 words, for XOR + popcount distances."""
    raw = b"".join(bytes.fromhex(h) for h in hex_hashes)
    width = len(hex_hashes[0]) // 2 if len(hex_hashes) else 8
    padded = (width + 7) // 8 * 8
    data = np.frombuffer(raw, np.uint8).reshape(len(hex_hashes), width)
    if padded != width:
        data = np.pad(data, ((0, 0), (0, padded - width)))
    return np.ascontiguousarray(data).view(">u8").astype(np.uint64)


def distances(words: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words[i] ^ words[j]).sum(axis=1)


def _exact_pairs(words: np.ndarray, t: int, chunk: int = 1024):
    n = len(words)
    for start in range(0, n, chunk):
        block = words[start : start + chunk]  # (C, W) against all rows after each
        d = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(axis=2)  # (C, N)
        a, b = np.nonzero(d <= t)
        a = a + start
        later = b > a
        yield a[later], b[later]


def _lsh_pairs(words: np.ndarray, t: int, tables: int, bits_per_table: int, seed: int):
    n = len(words)
    bits = np.unpackbits(words.view(np.uint8), axis=1)  # (N, B): which bit is which does not matter here
    rng = np.random.default_rng(seed)
    powers = np.left_shift(np.uint64(1), np.arange(bits_per_table, dtype=np.uint64))
    for _ in range(tables):
        chosen = rng.choice(bits.shape[1], size=bits_per_table, replace=False)
        keys = (bits[:, chosen] * powers).sum(axis=1, dtype=np.uint64)  # (N,) the sampled bits as one integer
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for offset in range(1, min(MAX_RUN_OFFSET, n - 1) + 1):
            same = sorted_keys[offset:] == sorted_keys[:-offset]
            if not same.any():
                break
            a, b = order[:-offset][same], order[offset:][same]
            close = distances(words, a, b) <= t
            yield np.minimum(a, b)[close], np.maximum(a, b)[close]


def near_duplicate_groups(
    hex_hashes, max_distance: int, exact_below: int = 10000, tables: int = 40, bits_per_table: int = 20, seed: int = 0
) -> np.ndarray:
    """A group label per row; rows whose hash is null form groups of their own."""
    hex_hashes = np.asarray(hex_hashes, dtype=object)
    present = np.array([isinstance(h, str) for h in hex_hashes])
    labels = np.arange(len(hex_hashes)) + len(hex_hashes)  # rows without a hash: alone
    if not present.any():
        return labels
    rows = np.flatnonzero(present)
    # Identical hashes first: one representative each, so a thousand copies do not make a million pairs.
    unique, first_row, inverse = np.unique(hex_hashes[rows].astype(str), return_index=True, return_inverse=True)
    words = hashes_to_words(list(unique))
    pairs = (
        _exact_pairs(words, max_distance)
        if len(unique) < exact_below
        else _lsh_pairs(words, max_distance, tables, bits_per_table, seed)
    )
    found = list(pairs)
    a = np.concatenate([p[0] for p in found]) if found else np.zeros(0, int)
    b = np.concatenate([p[1] for p in found]) if found else np.zeros(0, int)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(unique), len(unique)))
    _, component = connected_components(graph, directed=False)
    labels[rows] = component[inverse]
    return labels
