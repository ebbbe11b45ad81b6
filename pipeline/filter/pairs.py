"""Pair grids: what a duplicate rule took for a repeat, shown as "kept | dropped" thumbnails with their
distance, so that a user can judge a threshold by eye instead of by the count it drops.

The pairs shown are spread over the distance range (closest first, the threshold's edge last), because a
random sample of a rule's pairs is mostly the easy, near-identical ones.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

GRID_PAIRS = 16
GRID_COLUMNS = 4
THUMBNAIL_SIDE = 96  # px per thumbnail in the grid
GAP = 4  # px of white between the kept and the dropped thumbnail
CELL = (220, 150)  # px per pair: the two thumbnails, then two lines of label under them
HEADER = 40  # px above the pairs for the title
DPI = 100


@dataclass
class RulePairs:
    """What one duplicate rule dropped: row `dropped[j]` repeats row `kept[j]`, a row that this rule kept
    (a later rule may still drop it), at `distance[j]` (`distance_name` says in what)."""

    rule: str
    distance_name: str
    dropped: np.ndarray
    kept: np.ndarray
    distance: np.ndarray


def spread_sample(distance: np.ndarray, count: int = GRID_PAIRS, seed: int = 0) -> np.ndarray:
    """Positions of up to `count` pairs, evenly spaced in order of distance, closest first. Ties (all of
    an exact rule's pairs are at 0) are broken in a seeded random order, so the sample is not just the
    smallest keys."""
    shuffled = np.random.default_rng(seed).permutation(len(distance))
    ordered = shuffled[np.argsort(distance[shuffled], kind="stable")]  # NaN (no distance) last
    if len(ordered) <= count:
        return ordered
    # Steps of (n-1)/(count-1) > 1, so the rounded positions are distinct.
    return ordered[np.round(np.linspace(0, len(ordered) - 1, count)).astype(int)]


def grid_shape(pairs: int) -> tuple[int, int]:
    """(columns, rows) of pairs in a grid of `pairs` pairs."""
    columns = max(1, min(GRID_COLUMNS, pairs))
    return columns, max(1, math.ceil(pairs / columns))


def pair_grid(pairs: RulePairs, thumbnail: np.ndarray, key: np.ndarray, seed: int = 0) -> bytes:
    """A PNG of up to GRID_PAIRS pairs of `pairs`, each "kept | dropped" from the rows' stored thumbnails
    (view 0, the frame) with the distance and the two keys under it. `thumbnail`, `key`: per row."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    from pipeline.thumbnails import thumbnail_image

    shown = spread_sample(pairs.distance, GRID_PAIRS, seed)
    columns, rows = grid_shape(len(shown))
    width, height = columns * CELL[0], rows * CELL[1] + HEADER
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(
        0.5,
        1 - 8 / height,
        f"{pairs.rule}: {len(shown)} of {len(pairs.dropped)} pairs, kept | dropped, by {pairs.distance_name}",
        ha="center",
        va="top",
        fontsize=9,
    )
    gap = np.full((THUMBNAIL_SIDE, GAP, 3), 255, np.uint8)
    image_width = 2 * THUMBNAIL_SIDE + GAP
    for slot, j in enumerate(shown.tolist()):
        kept, dropped = int(pairs.kept[j]), int(pairs.dropped[j])
        both = np.concatenate(
            [np.asarray(thumbnail_image(thumbnail[kept], 0, THUMBNAIL_SIDE)), gap]
            + [np.asarray(thumbnail_image(thumbnail[dropped], 0, THUMBNAIL_SIDE))],
            axis=1,
        )  # (96, 196, 3)
        column, row = slot % columns, slot // columns
        left = column * CELL[0] + (CELL[0] - image_width) / 2
        top = HEADER + row * CELL[1]  # px from the figure's top
        ax = fig.add_axes(
            [left / width, 1 - (top + THUMBNAIL_SIDE) / height, image_width / width, THUMBNAIL_SIDE / height]
        )
        ax.imshow(both, interpolation="nearest")
        ax.set_axis_off()
        distance = pairs.distance[j]
        label = f"{distance:.4f}" if np.isfinite(distance) else "n/a"
        fig.text(
            (column + 0.5) * CELL[0] / width,
            1 - (top + THUMBNAIL_SIDE + 4) / height,
            f"{pairs.distance_name} {label}\n{key[kept]} | {key[dropped]}",
            ha="center",
            va="top",
            fontsize=7,
        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches="tight": the PNG is exactly width × height
    plt.close(fig)
    return buffer.getvalue()
