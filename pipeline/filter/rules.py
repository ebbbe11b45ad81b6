"""Filter rules. Each is built from `conf/filter/*.yaml` through `_target_` and answers one question: which of
the rows still alive does it drop?

Row rules judge a row on its own; set rules compare rows (duplicates, top fractions). The filter runs every
row rule first, then the set rules, each in config order, so that a duplicate is only chosen among rows
that pass every row rule. Rows are in key order; "first" means smallest key.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import StageError
from pipeline.filter.candidates import neighbour_pairs
from pipeline.filter.confirm import Matcher, Tolerances
from pipeline.filter.near_duplicates import hash_pairs, star_groups
from pipeline.thumbnails import THUMBNAIL_BYTES, Thumbnails

PAIR_CHUNK = 8192


class Rule:
    kind = "row"
    columns: tuple[str, ...] = ()

    def drop(self, meta: dict[str, np.ndarray], alive: np.ndarray) -> np.ndarray:
        """A boolean mask over all rows; only rows in `alive` may be set."""
        raise NotImplementedError


class DuplicateRule(Rule):
    """A set rule that drops a row because it repeats another: it says which row each dropped one repeats,
    so that the selection can name it (`duplicate_of`, `group`) and the report can show the pairs."""

    kind = "set"
    distance_name = "distance"  # what `Duplicates.distance` measures, for the report's pair grid

    def duplicates(self, meta: dict[str, np.ndarray], alive: np.ndarray) -> Duplicates:
        raise NotImplementedError

    def drop(self, meta, alive):
        return self.duplicates(meta, alive).of >= 0


class Duplicates:
    """`of[i]`: the row that row i repeats, a row this rule keeps (-1: row i is not dropped by this rule);
    `distance[i]`: how far row i is from it (NaN where of[i] is -1)."""

    def __init__(self, of: np.ndarray, distance: np.ndarray | None = None):
        self.of = np.asarray(of, np.int64)
        self.distance = np.full(len(self.of), np.nan) if distance is None else np.asarray(distance, np.float64)

    @classmethod
    def from_groups(cls, rows: np.ndarray, groups: np.ndarray, n: int) -> Duplicates:
        """Rows (in key order) labelled by group: each group's first row stays, the others repeat it."""
        of = np.full(n, -1, np.int64)
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        keeper = rows[first][inverse]
        repeats = keeper != rows
        of[rows[repeats]] = keeper[repeats]
        return cls(of)


# Text columns as numpy's variable-width strings (null → None): 16 bytes a row for text up to 15 bytes (keys,
# shard names), the rest in one arena. An object array of `str` takes ~60 bytes more a row, plus its pointer:
# at 10M rows that was most of the filter's 13 GiB.
TEXT = np.dtypes.StringDType(na_object=None)
TEXT_PIECE = 1 << 20  # rows converted at once: the Python strings of one piece are all that exist at a time


def text_to_arrow(values: np.ndarray) -> pa.Array:
    """A TEXT array as an Arrow string array, a piece at a time (pyarrow does not read numpy's StringDType)."""
    pieces = [
        pa.array(values[i : i + TEXT_PIECE].astype(object), pa.string()) for i in range(0, len(values), TEXT_PIECE)
    ]
    return pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())


def present(values: np.ndarray) -> np.ndarray:
    """Per row, whether it holds a string: TEXT arrays, or objects (str, None)."""
    return np.fromiter((isinstance(v, str) for v in values), bool, len(values))


def _bounds(values: np.ndarray, low, high) -> np.ndarray:
    bad = np.zeros(len(values), bool)
    if low is not None:
        bad |= values < low
    if high is not None:
        bad |= values > high
    return bad


class ImageSize(Rule):
    """The original image's shorter side at least `min_side`, its longer side at most `max_side`."""

    columns = ("original_width", "original_height")

    def __init__(self, min_side: int | None = None, max_side: int | None = None):
        self.min_side, self.max_side = min_side, max_side

    def drop(self, meta, alive):
        w, h = meta["original_width"], meta["original_height"]
        return alive & (_bounds(np.minimum(w, h), self.min_side, None) | _bounds(np.maximum(w, h), None, self.max_side))


class AspectRatio(Rule):
    """Longer side over shorter side at most `max`."""

    columns = ("aspect_ratio",)

    def __init__(self, max: float):
        self.max = max

    def drop(self, meta, alive):
        return alive & (meta["aspect_ratio"] > self.max)


class CaptionLength(Rule):
    columns = ("caption_words", "caption_chars")

    def __init__(self, min_words=None, max_words=None, min_chars=None, max_chars=None):
        self.words, self.chars = (min_words, max_words), (min_chars, max_chars)

    def drop(self, meta, alive):
        return alive & (_bounds(meta["caption_words"], *self.words) | _bounds(meta["caption_chars"], *self.chars))


class ClipScore(Rule):
    """Image–caption cosine at least `min`, or the `top_fraction` best of the rows still alive (DataComp's
    CLIP-score filtering). Exactly one of the two."""

    columns = ("clip_score",)

    def __init__(self, min: float | None = None, top_fraction: float | None = None):
        if (min is None) == (top_fraction is None):
            raise StageError(f"filter.clip_score: set exactly one of min ({min}) and top_fraction ({top_fraction})")
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise StageError(f"filter.clip_score.top_fraction={top_fraction}; expected a fraction in (0, 1]")
        self.min, self.top_fraction = min, top_fraction
        self.kind = "row" if min is not None else "set"

    def drop(self, meta, alive):
        score = meta["clip_score"]
        if self.min is not None:
            return alive & ~(score >= self.min)  # a null score (NaN) fails too
        candidates = np.flatnonzero(alive)
        keep = int(round(self.top_fraction * len(candidates)))
        # Stable order on (-score, row): ties go to the smaller key, so the cut is deterministic.
        ranked = candidates[np.lexsort((candidates, -np.nan_to_num(score[candidates], nan=-np.inf)))]
        dropped = np.zeros(len(score), bool)
        dropped[ranked[keep:]] = True
        return dropped


class ExactDuplicate(DuplicateRule):
    """Identical image bytes (sha256): the first row of each group stays."""

    columns = ("sha256",)

    def duplicates(self, meta, alive):
        hashes = meta["sha256"]
        rows = np.flatnonzero(alive & present(hashes))  # a row without a hash repeats nothing
        # Arrow's hash table numbers the hashes: sorting 10M strings (np.unique) took 3 GB more than the column.
        codes = pc.dictionary_encode(text_to_arrow(hashes[rows])).indices.to_numpy()
        found = Duplicates.from_groups(rows, codes, len(alive))
        found.distance[found.of >= 0] = 0.0
        return found


class NearDuplicate(DuplicateRule):
    """One picture, altered (resized, re-encoded, cropped, lighter or darker): its rows are one group, whose
    first row stays. Candidates are pairs of rows whose difference hashes are within `max_distance` bits, or
    whose thumbnails are among each other's `neighbours` most correlated; each candidate is confirmed by
    aligning and comparing the two thumbnails (pipeline/filter/confirm.py, where the tolerances are
    explained). Each group holds rows confirmed against its kept row itself (near_duplicates.star_groups)."""

    columns = ("dhash", "thumbnail")
    distance_name = "1 - correlation"

    def __init__(
        self,
        max_distance: int = 20,
        neighbours: int = 10,
        min_similarity: float = 0.6,
        # the tolerances' defaults are Tolerances', stated once (conf/filter/basic.yaml says why each is what it is)
        max_margin: float = Tolerances.max_margin,
        min_correlation: float = Tolerances.min_correlation,
        max_block_residual: float = Tolerances.max_block_residual,
        max_colour_residual: float = Tolerances.max_colour_residual,
        max_aspect_change: float = Tolerances.max_aspect_change,
        max_contrast_change: float = Tolerances.max_contrast_change,
        flips: bool = Tolerances.flips,
        exact_below: int = 10000,
        tables: int = 40,
        bits_per_table: int = 20,
        seed: int = 0,
    ):
        if not 0 <= max_margin < 0.5:
            raise StageError(f"near_duplicate.max_margin={max_margin}; expected a share of the side in [0, 0.5)")
        if not -1 <= min_similarity <= 1 or not -1 <= min_correlation <= 1:
            raise StageError("near_duplicate.min_similarity and min_correlation are correlations, in [-1, 1]")
        self.max_distance, self.neighbours, self.min_similarity = int(max_distance), int(neighbours), min_similarity
        self.search = {"exact_below": exact_below, "tables": tables, "bits_per_table": bits_per_table, "seed": seed}
        self.tolerances = Tolerances(
            max_margin,
            min_correlation,
            max_block_residual,
            max_colour_residual,
            max_aspect_change,
            max_contrast_change,
            bool(flips),
        )

    def candidates(self, hashes: np.ndarray, blobs: np.ndarray) -> np.ndarray:
        by_hash = hash_pairs(hashes, self.max_distance, **self.search)
        by_thumbnail = neighbour_pairs(blobs, self.neighbours, self.min_similarity, self.search["seed"])
        pairs = np.concatenate([by_hash, by_thumbnail])
        pairs = np.stack([pairs.min(1), pairs.max(1)], 1)
        return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)

    def duplicates(self, meta, alive):
        n = len(alive)
        valid = present(meta["dhash"]) & np.array(
            [isinstance(t, bytes) and len(t) == THUMBNAIL_BYTES for t in meta["thumbnail"]]
        )
        rows = np.flatnonzero(alive & valid)
        if len(rows) < 2:
            return Duplicates(np.full(n, -1))
        blobs = meta["thumbnail"][rows]
        # Identical thumbnails are one picture: compare one representative each, numbered in key order (np.unique
        # numbers them by digest) so that the first row of a group stays. Found by 128-bit digests: a fixed-width
        # copy of the thumbnails to sort was 3 KB a row, the rule's largest allocation at a million rows.
        digests = np.array([hashlib.blake2b(b, digest_size=16).digest() for b in blobs], dtype="S16")
        _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
        order = np.argsort(first)
        first, inverse = first[order], np.argsort(order)[inverse]
        matcher = Matcher(self.tolerances)
        pairs = self.candidates(meta["dhash"][rows][first], blobs[first])
        confirmed = np.zeros(len(pairs), bool)
        correlation = np.zeros(len(pairs), np.float32)
        for start in range(0, len(pairs), PAIR_CHUNK):  # decoded a chunk of pairs at a time: bounded memory
            chunk = pairs[start : start + PAIR_CHUNK]
            a, b = (Thumbnails.decode(blobs[first[chunk[:, k]]]) for k in (0, 1))
            scores = matcher.compare(a, b)
            confirmed[start : start + len(chunk)] = scores.accepted(self.tolerances)
            correlation[start : start + len(chunk)] = scores.correlation
        keeper, to_keeper = star_groups(pairs[confirmed], 1 - correlation[confirmed], len(first))
        kept_row = rows[first[keeper[inverse]]]
        found = Duplicates(np.full(n, -1))
        found.of[rows] = np.where(kept_row != rows, kept_row, -1)
        # A copy of the kept row's own thumbnail is at 0; another picture at the distance of its pair with it.
        found.distance[rows] = np.where(keeper[inverse] == inverse, 0.0, to_keeper[inverse])
        found.distance[found.of < 0] = np.nan
        return found
