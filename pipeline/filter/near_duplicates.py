"""Near-duplicate pairs from perceptual hashes (Hamming distance ≤ t), and groups from confirmed pairs.

Small sets are compared exhaustively. Large ones use locality-sensitive hashing by bit sampling: each of
`tables` tables keys a hash by `bits_per_table` of its bits chosen at random (seeded); two hashes d bits
apart share a key with probability (1 - d/B)^k, so close pairs meet in some table almost surely while far
pairs almost never do. Every candidate pair is then checked exactly: a pair always means distance ≤ t.
"""

from __future__ import annotations

import numpy as np

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


def hash_pairs(
    hex_hashes, max_distance: int, exact_below: int = 10000, tables: int = 40, bits_per_table: int = 20, seed: int = 0
) -> np.ndarray:
    """(E, 2) row pairs whose hashes are within `max_distance` bits; every hash must be a string. Identical
    hashes are compared once: a thousand copies do not make a million pairs, but are all paired with one."""
    hex_hashes = np.asarray(hex_hashes, dtype=object).astype(str)
    if len(hex_hashes) < 2:
        return np.zeros((0, 2), np.int64)
    unique, first_row, inverse = np.unique(hex_hashes, return_index=True, return_inverse=True)
    words = hashes_to_words(list(unique))
    search = (
        _exact_pairs(words, max_distance)
        if len(unique) < exact_below
        else _lsh_pairs(words, max_distance, tables, bits_per_table, seed)
    )
    found = [np.stack([first_row[a], first_row[b]], 1) for a, b in search]
    # every copy of a hash is paired with the first row that has it
    copies = np.flatnonzero(first_row[inverse] != np.arange(len(hex_hashes)))
    found.append(np.stack([first_row[inverse[copies]], copies], 1))
    return np.concatenate(found).astype(np.int64)


def star_groups(pairs: np.ndarray, distance: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups in which every member was confirmed against the group's kept row itself: rows 0..n-1 are taken
    in order; a row not yet in a group keeps one, and takes every row paired with it that is still free.
    Unlike connected components, a chain of confirmations (a~b, b~c) cannot carry c into a's group: one
    false pair costs at most one row, never a whole picture and its copies. Returns each row's kept row and
    the distance of its pair with it (0 for a kept row)."""
    keeper = np.full(n, -1, np.int64)
    to_keeper = np.zeros(n)
    if len(pairs):
        both = np.concatenate([pairs, pairs[:, ::-1]])
        weights = np.concatenate([distance, distance])
        order = np.lexsort((weights, both[:, 0]))  # by row, then closest first
        both, weights = both[order], weights[order]
        starts = np.searchsorted(both[:, 0], np.arange(n + 1))
    for row in range(n):
        if keeper[row] >= 0:
            continue
        keeper[row] = row
        if not len(pairs):
            continue
        others, far = both[starts[row] : starts[row + 1], 1], weights[starts[row] : starts[row + 1]]
        free = keeper[others] < 0
        keeper[others[free]] = row
        to_keeper[others[free]] = far[free]
    return keeper, to_keeper
