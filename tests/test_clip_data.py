"""CLIP training data: every rank and loader worker reads its own samples, epochs have the planned length,
a resumed epoch continues where it stopped, corrupt samples are dropped and counted, transforms match CLIP's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.world.shards import write_world_shards
from support import shard_stream
from training.clip.model import image_processor_for
from training.data.shards import ShardList, next_worker, plan_epoch, round_robin
from training.data.transforms import EvalTransform, TrainTransform
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a red circle on the left", "two blue squares"], vocab_size=300, max_length=16)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """120 numbered samples in 8 shards of 15 (two of them corrupt)."""
    return write_world_shards(tmp_path_factory.mktemp("numbered"), 120, 15, image_size=24, corrupt=(7, 64))


def _read(stream, workers):
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
    return [b["keys"] for b in batches], sum(int(b["corrupt"]) for b in batches)


@pytest.mark.parametrize("per_shard", [15, 120])  # 8 shards ≥ 4 slots: dealt out; 1 shard: split by sample
def test_no_rank_sees_a_sample_twice_in_an_epoch(tmp_path, tokenizer, per_shard):
    path = write_world_shards(tmp_path, 120, per_shard, image_size=24)
    seen, per_rank = Counter(), []
    for epoch in (0, 1):
        epoch_keys = Counter()
        for rank in (0, 1):
            keys, _ = _read(shard_stream(path, tokenizer, rank=rank, world=2, workers=2, epoch=epoch), workers=2)
            per_rank.append(len(keys))
            epoch_keys.update(k for batch in keys for k in batch)
        assert max(epoch_keys.values()) == 1  # no duplicate within the epoch, across ranks and workers
        seen.update(epoch_keys)
        assert len(epoch_keys) >= 120 - 2 * 2 * 4  # at most a partial batch per slot is left out
    assert len(set(per_rank)) == 1  # every rank runs the same number of batches (DDP needs it)
    assert max(seen.values()) == 2  # the next epoch reads the samples again, in another order


def test_epoch_length_in_samples_and_resampled_streams(numbered, tokenizer):
    stream = shard_stream(numbered, tokenizer, resampled=True, epoch_samples=72, world=2, rank=1, workers=2)
    keys, _ = _read(stream, workers=2)
    assert len(keys) == 72 // (4 * 2) == len(stream)  # epoch length counted in samples over all ranks
    stream = shard_stream(numbered, tokenizer, resampled=True, epoch_samples=72, world=2, rank=1, workers=2, epoch=1)
    other_epoch, _ = _read(stream, workers=2)
    assert keys != other_epoch
    # Exact epochs default to the shards' size: 120 samples, minus the partial batches, over 1 rank.
    assert len(shard_stream(numbered, tokenizer, workers=2)) == 2 * (60 // 4)


def test_a_resumed_epoch_continues_where_it_stopped(numbered, tokenizer):
    """Skipping k batches (unread) gives exactly the batches an uninterrupted epoch has after its k-th, with
    two loader workers interleaving, and two corrupt samples in the shards: the resume also skips the corrupt
    samples each worker dropped while making the trained batches (counted as the data module counts them)."""
    stream = shard_stream(numbered, tokenizer, workers=2, epoch=3)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    full = [b["keys"] for b in batches]
    quota = [p.batches for p in sorted(stream.plans, key=lambda p: p.worker)]
    dropped_in_skipped = 0
    for k in (1, 5, 12, 20):
        corrupt = [0, 0]
        for b in range(k):
            corrupt[next_worker(quota, b)] += int(batches[b]["corrupt"])
        dropped_in_skipped = max(dropped_in_skipped, sum(corrupt))
        resumed, _ = _read(
            shard_stream(numbered, tokenizer, workers=2, epoch=3, skip_batches=k, skip_corrupt=corrupt), workers=2
        )
        assert resumed == full[k:], k
    assert dropped_in_skipped >= 1  # the case that needs the count: a corrupt sample before the resume point


def test_round_robin_matches_how_a_loader_interleaves_workers():
    assert round_robin([3, 1, 2], 6) == [3, 1, 2]
    assert round_robin([3, 1, 2], 4) == [2, 1, 1]  # rounds: w0 w1 w2, then w0
    assert round_robin([3, 1, 2], 5) == [2, 1, 2]
    assert round_robin([0, 5], 3) == [0, 3]
    assert round_robin([2, 2], 99) == [2, 2]


def test_corrupt_samples_are_skipped_and_counted(numbered, tokenizer):
    """Two of 120 samples are truncated JPEGs: both dropped and counted, never a crash. The epoch still has
    its planned 120 batches (ranks must stay in step), so the two short workers top up from their own
    shards' next pass."""
    keys, corrupt = _read(shard_stream(numbered, tokenizer, workers=2, batch_size=1), workers=2)
    flat = [k for batch in keys for k in batch]
    assert "000000007" not in flat and "000000064" not in flat
    assert len(flat) == 120 and len(set(flat)) == 118
    assert corrupt >= 2  # the top-up pass may meet them again


def test_transforms_match_clip_preprocessing(tokenizer):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    ours = EvalTransform(32)(image)
    theirs = torch.as_tensor(np.asarray(image_processor_for(32)(image)["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.05  # same resize, crop and normalisation up to resampling detail
    crop = TrainTransform(32, scale=(0.5, 0.5))
    left, top, right, bottom = crop.crop_box(60, 40, np.random.default_rng(1))
    assert abs((right - left) * (bottom - top) / 2400 - 0.5) < 0.05
    a, b = (crop(image, np.random.default_rng(seed)) for seed in (1, 1))
    assert torch.equal(a, b) and a.shape == (3, 32, 32)  # the same seed, the same augmentation


def test_next_worker_follows_the_interleaving():
    order = [0, 1, 2, 0, 2, 0]  # counts [3, 1, 2]: w0 w1 w2 | w0 w2 | w0
    assert [next_worker([3, 1, 2], k) for k in range(6)] == order


# (shards, ranks, workers per rank): the scales users run, where dealing whole shards to slots read 51% (1,000
# shards on 64 × 8) or 64% (100 on 8 × 8) of the samples per epoch.
SCALES = [(1_000, 64, 8), (100, 8, 8), (7, 2, 4), (41_408, 256, 8)]


@pytest.mark.parametrize("n_shards,world,workers", SCALES)
def test_an_exact_epoch_reads_every_sample_at_most_once_and_nearly_all_at_any_scale(n_shards, world, workers):
    """The plan alone (a pure function, no data): shards of 9,000–10,000 samples, 256 per batch per rank."""
    sizes = np.random.default_rng(n_shards).integers(9_000, 10_001, n_shards)
    shards = ShardList(tuple(f"s3://bucket/{i:06d}.tar" for i in range(n_shards)), tuple(int(n) for n in sizes))
    batch = 256
    read = {url: [] for url in shards.urls}  # (start, stop) ranges of each shard, over all slots
    batches_per_rank = set()
    for rank in range(world):
        plans = plan_epoch(shards, epoch=1, seed=0, rank=rank, world=world, workers=workers, batch_size=batch,
                           resampled=False, epoch_samples=None)  # fmt: skip
        batches_per_rank.add(sum(p.batches for p in plans))
        for plan in plans:
            if plan.stride == 1:  # contiguous: the segments are what it reads
                assert sum(s.stop - s.start for s in plan.segments) == plan.batches * batch  # whole batches
                ranges = [(s.url, s.start, s.stop) for s in plan.segments]
            else:  # small data: its chunks of the whole sequence, as many as its batches
                starts = np.cumsum([0] + [s.stop - s.start for s in plan.segments])
                chunks = [plan.offset + m * plan.stride for m in range(plan.batches)]
                ranges = []
                for c in chunks:
                    i = int(np.searchsorted(starts, c * batch, side="right")) - 1
                    segment = plan.segments[i]
                    local = c * batch - int(starts[i])
                    assert local + batch <= segment.stop - segment.start or i + 1 < len(plan.segments)
                    ranges.append((segment.url, local, min(local + batch, segment.stop)))
                    if local + batch > segment.stop:  # the chunk runs on into the next shard
                        ranges.append((plan.segments[i + 1].url, 0, local + batch - segment.stop))
            for url, start, stop in ranges:
                read[url].append((start, stop))
    assert len(batches_per_rank) == 1  # every rank runs the same number of batches
    for url, size in zip(shards.urls, shards.sizes):
        ranges = sorted(read[url])
        assert all(0 <= a < b <= size for a, b in ranges)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:])), url  # no sample read twice
    fraction = sum(b - a for ranges in read.values() for a, b in ranges) / shards.samples
    print(f"{n_shards} shards on {world} × {workers}: {fraction:.2%} of the samples read")
    assert fraction >= 0.99
    assert shards.samples * (1 - fraction) < (world + 1) * batch  # what is left: about one global batch
