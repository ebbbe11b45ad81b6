"""Which samples each rank and each loader worker reads in an epoch, decided from shard sizes alone.

Every rank computes the same plan from (seed, epoch, world size, workers), so no coordination is needed:
- *Exact epochs* (`resampled=false`), planned by samples, not by shards: the shard list is shuffled per
  epoch and read as one sequence of samples, cut into `world × workers` contiguous ranges, one per reading
  slot, each exactly as long as its slot's batches need. A slot reads whole shards, and at most two partial
  ones at its ends (a shard split between neighbouring slots is read up to the cut by the first). With
  fewer shards than slots (small data), every slot reads the whole sequence, cut into batch-sized chunks,
  and keeps its own: rank r's i-th batch is chunk i·world + r, so each global batch is the same set of
  samples whatever the number of ranks. Either way no sample is read twice in an epoch and every epoch
  reads all but fewer than `(world + 1) × batch_size` samples, whatever the number of shards, ranks and
  workers (dealing whole shards to slots, and cutting every rank to the shortest, read half the samples of
  1,000 shards on 64 GPUs × 8 workers).
- *Resampled* (`resampled=true`): each slot draws shards with replacement, endlessly (open_clip's mode for
  streams with no natural epoch).
Each rank runs the same number of batches (DDP and FSDP need that). `round_robin` says how many of those
batches each worker supplies, since a DataLoader takes one batch from each worker in turn; the same function
tells a resumed run how many batches each worker must skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from training.data.sources import Folder, exists, expand, is_pipe, open_shard
from training.errors import UserError


@dataclass(frozen=True)
class ShardList:
    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per shard

    @property
    def samples(self) -> int:
        return int(sum(self.sizes))

    def split(self, holdout: int) -> tuple[ShardList, ShardList]:
        """(the first n - holdout shards, the last holdout) — a validation split that never moves."""
        if holdout >= len(self.urls):
            raise UserError(f"val_shards={holdout} leaves no training shard out of {len(self.urls)}")
        cut = len(self.urls) - holdout
        return ShardList(self.urls[:cut], self.sizes[:cut]), ShardList(self.urls[cut:], self.sizes[cut:])


def _count_samples(url: str) -> int:
    import tarfile

    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar if m.isfile()})


def list_shards(path: str) -> ShardList:
    """A folder of tars (sizes from its `sizes.json`, as the shard stage and img2dataset-style tools write
    it), or a brace pattern such as `data/{00000..00099}.tar`; local, any fsspec URL (`s3://…`), or `pipe:`
    commands (sizes then come from reading each stream once). Sizes missing from `sizes.json` are counted."""
    path = str(path)
    folder = None if is_pipe(path) else Folder(path)
    if folder is not None and folder.isdir():
        urls = folder.files(".tar")
    else:
        urls = sorted(expand(path))
        parent = None if is_pipe(path) or not urls else Folder(urls[0].rsplit("/", 1)[0])
        folder = parent if parent is not None and parent.isdir() else None
    if not urls:
        raise UserError(
            f"data path {path} holds no .tar shards; expected the output of pipeline.shard or a brace pattern"
        )
    missing = [u for u in urls if not exists(u)]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist ({len(missing)} missing)")
    known = json.loads(folder.read_text("sizes.json")) if folder is not None and folder.exists("sizes.json") else {}
    names = [u.rsplit("/", 1)[-1] for u in urls]
    sizes = tuple(int(known[n]) if n in known else _count_samples(u) for n, u in zip(names, urls))
    return ShardList(tuple(urls), sizes)


def round_robin(counts: list[int], total: int) -> list[int]:
    """How many of the first `total` batches come from each worker, when a loader takes one batch from each
    worker in turn and skips workers that have run dry."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(min(total, counts.sum()))
    # Full rounds first: the largest r with sum(min(counts, r)) <= total, found by bisection.
    lo, hi = 0, int(counts.max(initial=0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    taken = np.minimum(counts, lo)
    left = total - int(taken.sum())
    for worker in np.flatnonzero(counts > lo)[:left]:  # the partial round, in worker order
        taken[worker] += 1
    return taken.tolist()


def next_worker(counts: list[int], done: int) -> int:
    """Which worker supplies batch number `done` (0-based) in that interleaving: of the workers with
    batches left, the one in the earliest round, the lowest index first."""
    taken = round_robin(counts, done)
    left = [(taken[w], w) for w in range(len(counts)) if taken[w] < counts[w]]
    return min(left)[1] if left else 0


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, counted in the order the shard stores them."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) reads in one epoch."""

    segments: tuple[Segment, ...]  # exact epochs: these samples, in this order …
    stride: int  # … keeping, of their batch-sized chunks, those whose number is `offset` mod `stride` (1: all)
    offset: int
    urls: tuple[str, ...]  # resampled: shards drawn from these
    batches: int  # batches it yields this epoch
    skip_batches: int  # batches already trained before a resume, skipped unread …
    skip_corrupt: int  # … with the corrupt samples dropped while they were made, skipped unread too
    seed: int  # for its shard draws and shuffle buffer
    worker: int  # its slot among the rank's workers (the plan list is rotated for a resume)


def slot_segments(sizes: np.ndarray, order: np.ndarray, urls: tuple[str, ...], start: int, stop: int):
    """The samples [start, stop) of the shards read in `order`, as segments of those shards."""
    ends = np.cumsum(sizes[order])  # sample count after each shard of the sequence
    first = int(np.searchsorted(ends, start, side="right"))
    segments = []
    for position in range(first, len(order)):
        shard_start = int(ends[position] - sizes[order[position]])
        if shard_start >= stop:
            break
        lo, hi = max(start, shard_start) - shard_start, min(stop, int(ends[position])) - shard_start
        if hi > lo:
            segments.append(Segment(urls[order[position]], lo, hi))
    return tuple(segments)


def plan_epoch(
    shards: ShardList,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    workers: int,
    batch_size: int,
    resampled: bool,
    epoch_samples: int | None,
    skip_batches: int = 0,
    skip_corrupt: list[int] | None = None,
) -> list[SlotPlan]:
    """The plan of every worker of `rank`; `batch_size` is per rank. Identical on every rank. A resume gives
    the batches trained and, per worker, the corrupt samples dropped while making them."""
    slots = world * workers
    sizes = np.asarray(shards.sizes, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards.urls))
    total = shards.samples if resampled else min(epoch_samples or shards.samples, shards.samples)
    epoch_batches = (epoch_samples if resampled and epoch_samples else total) // (batch_size * world)  # per rank
    strided = not resampled and len(shards.urls) < slots
    if strided:  # worker w of rank r keeps chunks c with c mod slots = w·world + r (its batches, in order)
        chunks = total // batch_size
        keys = [w * world + rank for w in range(workers)]
        quota = round_robin([(chunks - k + slots - 1) // slots for k in keys], min(epoch_batches, chunks // world))
    else:  # workers of a rank share its batches as evenly as they can; every rank splits them the same way
        quota = [epoch_batches // workers + (1 if w < epoch_batches % workers else 0) for w in range(workers)]
    skip = min(skip_batches, epoch_batches)
    done = round_robin(quota, skip)
    whole = tuple(Segment(shards.urls[i], 0, int(sizes[i])) for i in order) if strided else ()
    plans = []
    for w in range(workers):
        slot = rank * workers + w
        if resampled:
            segments = ()
        elif strided:
            segments = whole
        else:  # slots take consecutive ranges of the shuffled sequence, slot 0 first
            start = (rank * epoch_batches + sum(quota[:w])) * batch_size
            segments = slot_segments(sizes, order, shards.urls, start, start + quota[w] * batch_size)
        plans.append(
            SlotPlan(
                segments=segments,
                stride=slots if strided else 1,
                offset=w * world + rank if strided else 0,
                urls=shards.urls if resampled else (),
                batches=quota[w],
                skip_batches=done[w],
                skip_corrupt=int(skip_corrupt[w]) if skip_corrupt and skip else 0,
                seed=int(np.random.SeedSequence([seed, epoch, slot]).generate_state(1)[0]),
                worker=w,
            )
        )
    # A loader always starts with its worker 0: after a resume, worker 0 must read the slot that was next.
    first = next_worker(quota, skip)
    return plans[first:] + plans[:first]
