"""Semantic deduplication (SemDeDup, Abbas et al. 2023): images whose CLIP embeddings are nearly parallel
show the same thing — a re-crop, a re-encode, a watermark, a near-identical product shot — even where their
bytes and perceptual hashes differ.

Spherical k-means (faiss) over the L2-normalised image embeddings splits the rows into clusters. Within a
cluster the rows are ranked in keep order, and a row is dropped when its cosine similarity to any row ranked
before it exceeds 1 - eps. Comparing only within clusters is what makes this affordable (about n·sqrt(n)
products instead of n²); the price, as in SemDeDup, is that a pair split across two clusters is not seen.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from pipeline.errors import StageError
from pipeline.filter.rules import DuplicateRule, Duplicates

# The thresholds SemDeDup's table reports: from near-identical copies only (0.001) to loose paraphrases (0.2).
EPS_VALUES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# Which row of a duplicate set stays: closest to its cluster centroid (NeMo Curator's "easy"), farthest
# from it ("hard"), or the best image–caption match.
KEEP_ORDERS = ("centroid", "far", "score")


class RankedDuplicates(Duplicates):
    """SemDeDup's answer, with what its eps table needs: each row's highest similarity to a row ranked before
    it in its cluster (`earliest`; -inf for rows it did not judge) and the rows it was asked about."""

    def __init__(self, of, distance, earliest: np.ndarray, asked: int):
        super().__init__(of, distance)
        self.earliest, self.asked = earliest, asked

    def eps_table(self, eps_values=EPS_VALUES) -> list[dict]:
        """For each eps: rows dropped at that threshold and the fraction of the rows asked about kept — from
        the one clustering and pass that made this answer."""
        table = []
        for eps in eps_values:
            dropped = int(np.count_nonzero(self.earliest > 1 - eps))
            kept = (self.asked - dropped) / self.asked if self.asked else 1.0
            table.append({"eps": eps, "dropped": dropped, "kept_fraction": kept})
        return table


class SemanticDuplicate(DuplicateRule):
    """Rows whose image embeddings have cosine similarity above 1 - `eps` to a row ranked before them in the
    same k-means cluster (`clusters`; null: about sqrt(rows)). `keep` orders each cluster: "centroid",
    "far" or "score" (highest clip_score); ties go to the smaller key. Rows without an embedding stay.
    `max_cluster` bounds the rows compared in one block, so memory is max_cluster² floats whatever the
    size of a cluster."""

    distance_name = "cosine distance"

    def __init__(
        self,
        eps: float = 0.05,
        clusters: int | None = None,
        keep: str = "centroid",
        iterations: int = 20,
        seed: int = 0,
        max_cluster: int = 4096,
    ):
        if not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise StageError(f"SemanticDuplicate.eps={eps!r}; expected a cosine distance in (0, 1)")
        if keep not in KEEP_ORDERS:
            raise StageError(f"SemanticDuplicate.keep={keep!r}; expected one of {', '.join(KEEP_ORDERS)}")
        for name, value in (("clusters", clusters), ("iterations", iterations), ("max_cluster", max_cluster)):
            if not (value is None and name == "clusters") and (not isinstance(value, int) or value < 1):
                raise StageError(f"SemanticDuplicate.{name}={value!r}; expected a whole number of at least 1")
        if not isinstance(seed, int):
            raise StageError(f"SemanticDuplicate.seed={seed!r}; expected a whole number")
        self.eps, self.clusters, self.keep = float(eps), clusters, keep
        self.iterations, self.seed, self.max_cluster = iterations, seed, max_cluster
        self.columns = ("image_embedding", "clip_score") if keep == "score" else ("image_embedding",)

    def duplicates(self, meta, alive) -> RankedDuplicates:
        n = len(alive)
        of, distance = np.full(n, -1, np.int64), np.full(n, np.nan)
        earliest = np.full(n, -np.inf, np.float32)  # each row's highest similarity to a row ranked before it
        rows, unit, bounds = self._ranked_clusters(meta, alive)
        threshold = 1 - self.eps
        for start, stop in bounds:
            x = unit[start:stop]  # (m, d), in keep order
            best, earlier = most_similar_earlier(x, self.max_cluster)
            earliest[rows[start:stop]] = best
            dropped = best > threshold
            if not dropped.any():
                continue
            target = kept_targets(x, dropped, earlier, threshold, self.max_cluster)
            lost = np.flatnonzero(dropped)
            of[rows[start:stop][lost]] = rows[start:stop][target[lost]]
            cosine = np.einsum("ij,ij->i", x[lost], x[target[lost]])
            distance[rows[start:stop][lost]] = np.clip(1 - cosine.astype(np.float64), 0, 2)
        return RankedDuplicates(of, distance, earliest, int(np.count_nonzero(alive)))

    def eps_table(self, meta, alive, eps_values=EPS_VALUES) -> list[dict]:
        """For each eps: rows this rule would drop and the fraction of `alive` it would keep."""
        return self.duplicates(meta, alive).eps_table(eps_values)

    def _ranked_clusters(self, meta, alive) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """The alive rows that have an embedding, grouped by cluster and in keep order within each;
        their unit embeddings in that order; and each cluster's (start, stop) in it."""
        embeddings = np.asarray(meta["image_embedding"])
        if embeddings.ndim != 2:
            raise StageError(
                f"image_embedding has shape {embeddings.shape}; expected (rows, dim) floats from pipeline.annotate"
            )
        rows = np.flatnonzero(alive)
        x = embeddings[rows].astype(np.float32)
        norm = np.linalg.norm(x, axis=1)
        usable = np.isfinite(x).all(axis=1) & (norm > 0)  # a null embedding (NaN row) is never a duplicate
        rows, x = rows[usable], np.ascontiguousarray(x[usable] / norm[usable, None])
        if not len(rows):
            return rows, x, []
        cluster, closeness = self._cluster(x)
        if self.keep == "centroid":
            rank = -closeness
        elif self.keep == "far":
            rank = closeness
        else:
            rank = -np.nan_to_num(np.asarray(meta["clip_score"], np.float64)[rows], nan=-np.inf)
        order = np.lexsort((rows, rank, cluster))  # by cluster, then keep order, then key
        starts = np.flatnonzero(np.diff(cluster[order], prepend=-1))
        bounds = list(zip(starts.tolist(), [*starts[1:].tolist(), len(order)]))
        return rows[order], x[order], bounds

    def _cluster(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's cluster and its cosine similarity to that cluster's centroid."""
        n, dim = x.shape
        k = min(n, max(1, self.clusters if self.clusters is not None else round(math.sqrt(n))))
        if k == 1:
            centroids = x.mean(axis=0, keepdims=True)
            centroids /= max(float(np.linalg.norm(centroids)), 1e-12)
            cluster = np.zeros(n, np.int64)
        else:
            # min_points_per_centroid=1: few rows per cluster is our choice (sqrt(n)), not a mistake to warn of.
            kmeans = faiss.Kmeans(
                dim, k, niter=self.iterations, seed=self.seed, spherical=True, min_points_per_centroid=1
            )
            kmeans.train(x)
            # Centroids are unit vectors (spherical), so the nearest in L2 is the most similar in cosine.
            _, nearest = kmeans.index.search(x, 1)
            centroids, cluster = kmeans.centroids, nearest[:, 0].astype(np.int64)
        return cluster, np.einsum("ij,ij->i", x, centroids[cluster])


def most_similar_earlier(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows `x` (m, d) in rank order: each row's highest cosine to a row ranked before it and that
    row's position (-inf and -1 for the first). Computed in (block, block) tiles of the lower triangle;
    ties go to the earlier-ranked row, as a plain argmax over the whole row would."""
    m = len(x)
    best, at = np.full(m, -np.inf, np.float32), np.full(m, -1, np.int64)
    for q in range(0, m, block):
        queries = x[q : q + block]
        for r in range(0, q + 1, block):  # reference tiles up to and including the diagonal one
            sim = queries @ x[r : r + block].T  # (queries, references)
            if r == q:  # on the diagonal tile only rows ranked strictly before the query count
                sim[np.triu_indices(len(queries), 0, sim.shape[1])] = -np.inf
            _update(best[q : q + block], at[q : q + block], sim, r)
    return best, at


def kept_targets(x: np.ndarray, dropped: np.ndarray, earlier: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """For each dropped row of one ranked cluster, the position of the row it repeats, a kept one: the most
    similar kept row ranked before it, when that similarity is above `threshold`. SemDeDup also drops a row
    whose only match above threshold is itself dropped (a chain a~b~c where a and c are further apart than
    eps); such a row follows `earlier` (its most similar earlier row) to where that row points, which ends
    at a kept row because each cluster's first row is kept."""
    lost, kept = np.flatnonzero(dropped), np.flatnonzero(~dropped)
    best, at = np.full(len(lost), -np.inf, np.float32), np.full(len(lost), -1, np.int64)
    for q in range(0, len(lost), block):
        queries = lost[q : q + block]
        for r in range(0, len(kept), block):
            references = kept[r : r + block]
            if references[0] >= queries[-1]:
                break  # this tile and the later ones rank after every query
            sim = x[queries] @ x[references].T  # (queries, references)
            sim[references[None, :] >= queries[:, None]] = -np.inf  # kept rows ranked before the query only
            _update(best[q : q + block], at[q : q + block], sim, r)
    target = np.full(len(x), -1, np.int64)
    found = best > threshold
    target[lost[found]] = kept[at[found]]
    for position in lost[~found].tolist():  # in rank order, so the row it follows is already resolved
        previous = earlier[position]
        target[position] = target[previous] if dropped[previous] else previous
    return target


def _update(best: np.ndarray, at: np.ndarray, sim: np.ndarray, offset: int) -> None:
    """Fold one tile into the running best (views, updated in place); only a strictly higher value wins,
    so earlier tiles (earlier-ranked rows) keep their ties."""
    j = sim.argmax(axis=1)
    value = sim[np.arange(len(sim)), j]
    better = value > best
    best[better] = value[better]
    at[better] = offset + j[better]


def format_eps_table(rows: list[dict]) -> str:
    """`eps_table`'s rows as fixed-width text: eps, rows dropped, % of rows kept."""
    lines = [f"{'eps':>7}{'dropped':>10}{'kept %':>9}"]
    for row in rows:
        lines.append(f"{row['eps']:>7g}{row['dropped']:>10}{100 * row['kept_fraction']:>8.1f}%")
    return "\n".join(lines)
