"""Filter rules. Each is built from `conf/filter/*.yaml` through `_target_` and answers one question: which of
the rows still alive does it drop?

Row rules judge a row on its own; set rules compare rows (duplicates, top fractions). The filter runs every
row rule first, then the set rules, each in config order, so that a duplicate is only chosen among rows
that pass every row rule. Rows are in key order; "first" means smallest key.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import StageError
from pipeline.filter.near_duplicates import near_duplicate_groups


class Rule:
    kind = "row"
    columns: tuple[str, ...] = ()

    def drop(self, meta: dict[str, np.ndarray], alive: np.ndarray) -> np.ndarray:
        """A boolean mask over all rows; only rows in `alive` may be set."""
        raise NotImplementedError


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


class ExactDuplicate(Rule):
    """Identical image bytes (sha256): the first row of each group stays."""

    kind = "set"
    columns = ("sha256",)

    def drop(self, meta, alive):
        rows = np.flatnonzero(alive)
        _, first = np.unique(meta["sha256"][rows].astype(str), return_index=True)
        dropped = alive.copy()
        dropped[rows[first]] = False
        return dropped


class NearDuplicate(Rule):
    """Perceptual hashes within `max_distance` bits are one group (transitively); its first row stays."""

    kind = "set"
    columns = ("dhash",)

    def __init__(
        self,
        max_distance: int = 20,
        exact_below: int = 10000,
        tables: int = 40,
        bits_per_table: int = 20,
        seed: int = 0,
    ):
        self.max_distance = int(max_distance)
        self.options = {"exact_below": exact_below, "tables": tables, "bits_per_table": bits_per_table, "seed": seed}

    def drop(self, meta, alive):
        rows = np.flatnonzero(alive)
        groups = near_duplicate_groups(meta["dhash"][rows], self.max_distance, **self.options)
        _, first = np.unique(groups, return_index=True)  # rows are in key order: first = smallest key
        dropped = alive.copy()
        dropped[rows[first]] = False
        return dropped
