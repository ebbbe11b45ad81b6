"""Which samples each rank and each loader worker reads in an epoch, decided from shard sizes alone.

Every rank computes the same plan from (seed, epoch, world size, workers), so no coordination is needed:
- *Exact epochs* (`resampled=false`): the shard list is shuffled per epoch and dealt to the
  `world × workers` reading slots; with fewer shards than slots, every slot reads all shards and keeps every
  `slots`-th sample instead. No sample is read twice in an epoch.
- *Resampled* (`resampled=true`): each slot draws shards with replacement, endlessly (open_clip's mode for
  streams with no natural epoch).
Each rank then runs the same number of batches (DDP and FSDP need that): the smallest rank's count, or the
configured epoch length in samples, whichever is smaller. `round_robin` says how many of those batches each
worker supplies, since a DataLoader takes one batch from each worker in turn; the same function tells a
resumed run how many batches each worker must skip.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
from webdataset.shardlists import expand_urls

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

    with tarfile.open(url, "r:") as tar:
        return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar if m.isfile()})


def list_shards(path: str) -> ShardList:
    """A folder of tars (sizes from its `sizes.json`, as the shard stage and img2dataset-style tools write
    it), or a brace pattern such as `data/{00000..00099}.tar`. Sizes missing from `sizes.json` are counted."""
    if os.path.isdir(path):
        urls = sorted(glob.glob(os.path.join(path, "*.tar")))
        sizes_file = os.path.join(path, "sizes.json")
    else:
        urls = sorted(expand_urls(path))
        sizes_file = os.path.join(os.path.dirname(urls[0]) if urls else "", "sizes.json")
    if not urls:
        raise UserError(
            f"data path {path} holds no .tar shards; expected the output of pipeline.shard or a brace pattern"
        )
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise UserError(f"shard {missing[0]} does not exist ({len(missing)} missing)")
    known = json.load(open(sizes_file)) if os.path.exists(sizes_file) else {}
    sizes = tuple(int(known[os.path.basename(u)]) if os.path.basename(u) in known else _count_samples(u) for u in urls)
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
class SlotPlan:
    """What one (rank, worker) reads in one epoch."""

    urls: tuple[str, ...]
    stride: int  # keep every stride-th sample (1: all) …
    offset: int  # … starting at this one
    batches: int  # batches it yields this epoch
    skip_batches: int  # batches already trained before a resume, skipped unread
    seed: int  # for its shard draws and shuffle buffer


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
) -> list[SlotPlan]:
    """The plan of every worker of `rank`; `batch_size` is per rank. Identical on every rank."""
    slots = world * workers
    budget = (epoch_samples if epoch_samples else shards.samples) // (batch_size * world)  # batches per rank
    if resampled:
        per_worker = [[budget] * workers for _ in range(world)]  # endless streams: the budget binds
        assignment = [shards.urls] * slots
        stride = 1
    else:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards.urls))
        if len(shards.urls) >= slots:
            assignment = [tuple(shards.urls[i] for i in order[s::slots]) for s in range(slots)]
            samples = [sum(shards.sizes[i] for i in order[s::slots]) for s in range(slots)]
            stride = 1
        else:  # too few shards to deal out: everyone reads all, keeps its share
            assignment = [tuple(shards.urls[i] for i in order)] * slots
            samples = [(shards.samples - s + slots - 1) // slots for s in range(slots)]
            stride = slots
        per_worker = [[samples[r * workers + w] // batch_size for w in range(workers)] for r in range(world)]
    epoch_batches = min(budget, *(sum(c) for c in per_worker))
    quota = round_robin(per_worker[rank], epoch_batches)
    skip = min(skip_batches, epoch_batches)
    done = round_robin(quota, skip)
    plans = [
        SlotPlan(
            urls=assignment[rank * workers + w],
            stride=stride,
            offset=rank * workers + w if stride > 1 else 0,
            batches=quota[w],
            skip_batches=done[w],
            seed=int(np.random.SeedSequence([seed, epoch, rank * workers + w]).generate_state(1)[0]),
        )
        for w in range(workers)
    ]
    # A loader always starts with its worker 0: after a resume, worker 0 must read the slot that was next.
    first = next_worker(quota, skip)
    return plans[first:] + plans[:first]
