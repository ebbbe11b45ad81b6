"""Image–caption WebDataset shards for CLIP training: a stream per loader worker and a LightningDataModule.

A worker's stream reads as a list of stages (open_clip's layout):
  its shards (training.data.shards plan) → tar samples → its share → shuffle buffer → skip what a resumed run
  already trained → decode + transform (corrupt samples dropped and counted) → tokenise in batches.
Batches are dicts: pixel_values (B, 3, S, S), input_ids and attention_mask (B, T) when a tokenizer is
attached, keys, captions, corrupt (how many samples were dropped since the previous batch of that worker).
Shards that `pipeline.encode` wrote hold the frozen encoders' outputs instead of pixels: their batches carry
latent_moments (B, 2C, h, w) and text_states (B, T, D).
"""

from __future__ import annotations

import io
import itertools
import logging
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.clip.model import CLIP_MEAN, CLIP_STD
from training.data.shards import ShardList, SlotPlan, list_shards, next_worker, plan_epoch
from training.data.sources import shard_samples
from training.data.transforms import EvalTransform, TrainTransform
from training.errors import UserError

log = logging.getLogger(__name__)
# Members that `pipeline.encode` writes: the VAE posterior's mean and log-variance, the text encoder's states.
LATENT_KEY, TEXT_STATES_KEY = "latent.npy", "text.npy"
TOP_UP_PASSES = 3  # an exact-epoch slot short of its quota (corrupt samples) rereads its shards, at most this often


class ShardStream(IterableDataset):
    """The batches of one rank for one epoch; each loader worker reads its own slot of the plan."""

    def __init__(
        self,
        shards: ShardList,
        *,
        tokenizer,
        transform,
        batch_size: int,
        context_length: int | None,
        epoch: int,
        seed: int,
        rank: int,
        world: int,
        workers: int,
        resampled: bool,
        epoch_samples: int | None,
        skip_batches: int = 0,
        skip_corrupt: list[int] | None = None,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        image_keys: str = "jpg;jpeg;png;webp",
        caption_key: str = "txt",
        caption_negatives: Callable | None = None,
    ):
        super().__init__()
        self.tokenizer, self.transform = tokenizer, transform
        self.caption_negatives = caption_negatives
        self.batch_size, self.context_length = int(batch_size), context_length
        self.seed, self.epoch, self.resampled = int(seed), int(epoch), bool(resampled)
        self.shuffle_buffer, self.shuffle_initial = int(shuffle_buffer), int(shuffle_initial)
        self.image_keys, self.caption_key = image_keys.split(";"), caption_key
        self.plans = plan_epoch(
            shards,
            epoch=epoch,
            seed=seed,
            rank=rank,
            world=world,
            workers=workers,
            batch_size=self.batch_size,
            resampled=resampled,
            epoch_samples=epoch_samples,
            skip_batches=skip_batches,
            skip_corrupt=skip_corrupt,
        )

    def __len__(self) -> int:
        """Batches in the whole epoch, including any a resumed run skips (Lightning counts those as done)."""
        return sum(p.batches for p in self.plans)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        if info and info.num_workers != len(self.plans):
            raise RuntimeError(f"stream planned for {len(self.plans)} workers runs in {info.num_workers}")
        plan = self.plans[worker]
        batches = wds.batched(self.batch_size, collation_fn=self._collate, partial=False)(self._samples(plan))
        yield from itertools.islice(batches, plan.batches - plan.skip_batches)

    @staticmethod
    def _shard_samples(urls):
        return shard_samples(urls)

    def _read(self, samples, seed: int):
        """`samples` through the shuffle buffer."""
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_initial, seed=seed)(samples)
        return samples

    def _samples(self, plan: SlotPlan):
        if self.resampled:
            rng = np.random.default_rng(plan.seed)
            draws = (plan.urls[int(rng.integers(len(plan.urls)))] for _ in itertools.count())
            samples = self._read(self._shard_samples(draws), plan.seed)
        else:
            # Each pass is shuffled on its own, so a top-up pass (only reached when corrupt samples left the
            # slot short) never mixes into the first.
            samples = itertools.chain.from_iterable(
                self._read(self._segment_samples(plan), plan.seed + p) for p in range(TOP_UP_PASSES)
            )
        # A resumed run skips what it trained, before any decoding: the stream is a function of the plan.
        # Trained batches consumed batch_size samples each plus the corrupt ones dropped on the way (counted
        # as they reached the model), so the skip lands exactly where the interrupted run stopped.
        samples = itertools.islice(samples, plan.skip_batches * self.batch_size + plan.skip_corrupt, None)
        self._corrupt = 0
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is None:
                self._corrupt += 1
            else:
                yield decoded

    def _segment_samples(self, plan: SlotPlan):
        """The slot's samples: each segment's shard read from its start up to the segment's end, then this
        slot's chunks when slots share the sequence (small data)."""
        samples = (
            sample
            for segment in plan.segments
            for sample in itertools.islice(self._shard_samples([segment.url]), segment.start, segment.stop)
        )
        if plan.stride == 1:
            return samples
        chunk = self.batch_size
        return (sample for i, sample in enumerate(samples) if (i // chunk) % plan.stride == plan.offset)

    def _decode(self, sample: dict) -> dict | None:
        """Image tensor + caption, or None for a sample that cannot be used (logged, never raised)."""
        key = sample.get("__key__", "?")
        try:
            caption = sample[self.caption_key].decode("utf-8").strip()
            if LATENT_KEY in sample:
                return {
                    "key": key,
                    "caption": caption,
                    "latent_moments": _array(sample[LATENT_KEY]),
                    "text_states": _array(sample[TEXT_STATES_KEY]),
                }
            data = next(sample[k] for k in self.image_keys if k in sample)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                # The augmentation depends on (seed, epoch, key) only: the same on a rerun or a resume.
                rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(key.encode())])
                pixels = self.transform(image, rng)
            decoded = {"key": key, "caption": caption, "pixels": pixels}
            if self.caption_negatives is not None:
                decoded["negatives"] = self.caption_negatives(caption, rng)
        except Exception as error:  # truncated JPEG, missing member, bad UTF-8: skip, count, go on
            log.warning("skipping sample %s: %s", key, (str(error) or type(error).__name__)[:200])
            return None
        return decoded

    def _collate(self, samples: list[dict]) -> dict[str, Any]:
        corrupt, self._corrupt = self._corrupt, 0
        captions = [s["caption"] for s in samples]
        batch = {"keys": [s["key"] for s in samples], "captions": captions, "corrupt": torch.tensor(corrupt)}
        for name in ("pixels", "latent_moments", "text_states"):
            if name in samples[0]:
                batch["pixel_values" if name == "pixels" else name] = torch.stack([s[name] for s in samples])
        if self.tokenizer is not None:
            # k hard negative captions per sample (data.caption_negatives), sample-major, None where a caption had
            # nothing to swap: tokenised with the captions in one call, then masked by `negative_valid`.
            negatives = [n for s in samples for n in s.get("negatives", ())]
            tokens = self.tokenizer(
                captions + [n or "" for n in negatives],
                padding="max_length",
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            )
            ids, mask, count = tokens["input_ids"], tokens["attention_mask"], len(captions)
            batch["input_ids"], batch["attention_mask"] = ids[:count], mask[:count]
            if "negatives" in samples[0]:
                batch["negative_input_ids"], batch["negative_attention_mask"] = ids[count:], mask[count:]
                batch["negative_valid"] = torch.tensor([n is not None for n in negatives])
        return batch


def _array(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False))


class EpochLoader:
    """What the Trainer iterates: a DataLoader over this epoch's stream, built when the epoch starts, so the
    epoch number and a resume position reach the workers."""

    def __init__(self, datamodule: ShardDataModule, train: bool):
        self.datamodule, self.train = datamodule, train

    def _stream(self) -> ShardStream:
        return self.datamodule.stream(self.train)

    def __len__(self) -> int:
        return len(self._stream())

    def __iter__(self):
        # A generator: nothing starts until the first batch is asked for (Lightning calls iter() early to
        # check that the loader is iterable).
        stream = self._stream()
        self.datamodule.started_epoch(self.train, stream)
        workers = self.datamodule.num_workers
        yield from DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
        )


class ShardDataModule(pl.LightningDataModule):
    """Training and validation batches from WebDataset shards. `batch_size` is per rank; an epoch is
    `epoch_samples` samples over all ranks (default: the training shards' size). `attach` gives it the
    tokenizer (None: captions stay text), image size and pixel normalisation once the model is known."""

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        num_workers: int = 2,
        val_path: str | None = None,
        val_shards: int = 0,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        seed: int = 0,
        crop_scale: tuple = (0.9, 1.0),
        flip: bool = False,
        train_transform: Callable | None = None,
        image_keys: str = "jpg;jpeg;png;webp",
        caption_key: str = "txt",
        caption_negatives: Callable | None = None,
    ):
        super().__init__()
        self.path, self.val_path, self.val_shards = path, val_path, int(val_shards)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        if self.batch_size < 1:
            raise UserError(f"data.batch_size={batch_size}: expected a whole number ≥ 1")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={num_workers}: expected a whole number ≥ 0")
        self.resampled, self.epoch_samples = bool(resampled), epoch_samples
        self.shuffle_buffer, self.shuffle_initial, self.seed = shuffle_buffer, shuffle_initial, int(seed)
        self.crop_scale, self.flip = tuple(crop_scale), bool(flip)
        # A partial of a transform class, called with (image_size, mean=, std=) once the model is known, e.g.
        # ShortSideCrop for latent diffusion (conf/task/ldm.yaml); None: CLIP's random resized crop.
        self.train_transform = train_transform
        self.image_keys, self.caption_key = image_keys, caption_key
        # caption, rng → k hard negative captions, None where there is none (caption_negatives.WordSwap); training
        # batches only
        self.caption_negatives = caption_negatives
        self.train_shards, self.validation_shards = self._split()
        self.tokenizer, self.image_size, self.context_length = None, None, None
        self.mean, self.std, self._attached = CLIP_MEAN, CLIP_STD, False
        self._resume: dict | None = None  # from a checkpoint: {"epoch", "batches"}
        self._trained = {"epoch": -1, "batches": 0}

    def _split(self) -> tuple[ShardList, ShardList | None]:
        shards = list_shards(self.path)
        if self.val_path:
            return shards, list_shards(self.val_path)
        if self.val_shards:
            return shards.split(self.val_shards)
        return shards, None

    def attach(self, tokenizer, image_size: int, context_length: int | None, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.tokenizer, self.image_size, self.context_length = tokenizer, int(image_size), context_length
        self.mean, self.std, self._attached = tuple(mean), tuple(std), True

    def captions(self, limit: int | None = None) -> list[str]:
        """Training captions (for a tokenizer), in shard order."""
        samples = shard_samples(self.train_shards.urls)
        texts = (s[self.caption_key].decode("utf-8", "replace") for s in samples if self.caption_key in s)
        return list(itertools.islice(texts, limit))

    def _layout(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream(self, train: bool) -> ShardStream:
        rank, world = self._layout()
        if not train:
            return self._unaugmented(self.validation_shards, rank, world, max(1, self.num_workers))
        self._require_attached()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        resuming = bool(self._resume) and self._resume["epoch"] == epoch
        skip = self._resume["batches"] if resuming else 0
        corrupt = self._resume.get("corrupt") if resuming else None
        stream = ShardStream(
            self.train_shards,
            transform=self._train_transform(),
            batch_size=self.batch_size,
            epoch=epoch,
            resampled=self.resampled,
            epoch_samples=self.epoch_samples,
            skip_batches=skip,
            skip_corrupt=corrupt,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_initial=self.shuffle_initial,
            caption_negatives=self.caption_negatives,
            **self._common(rank, world, max(1, self.num_workers)),
        )
        if len(stream) == 0:  # else the trainer ends at step 0 and exports an untrained model as if it had trained
            raise self._no_batch(world)
        return stream

    def _no_batch(self, world: int) -> UserError:
        """The refusal when an epoch's plan holds no whole batch (a threshold sweep's strictest value can leave a
        handful of samples), naming what limits the epoch: the shards, or `data.epoch_samples`."""
        samples, source = self.train_shards.samples, f"data.path={self.path}"
        if self.epoch_samples and (self.resampled or int(self.epoch_samples) < samples):
            samples, source = int(self.epoch_samples), f"data.epoch_samples={self.epoch_samples}"
        return UserError(
            f"{source}: {samples} training samples make no batch of data.batch_size={self.batch_size}"
            f" × {world} process(es); lower data.batch_size or add data"
        )

    def _train_transform(self):
        if self.train_transform is not None:
            return self.train_transform(self.image_size, mean=self.mean, std=self.std)
        return TrainTransform(self.image_size, scale=self.crop_scale, flip=self.flip, mean=self.mean, std=self.std)

    def preview(self, batches: int):
        """Up to `batches` unaugmented batches in this process, from the validation shards if there are any,
        else from the training shards (for measurements such as the latent scale)."""
        return itertools.islice(iter(self._unaugmented(self.validation_shards or self.train_shards, 0, 1, 1)), batches)

    def _unaugmented(self, shards: ShardList, rank: int, world: int, workers: int) -> ShardStream:
        """Every sample once, in shard order, resized and centre-cropped (validation, measurements)."""
        self._require_attached()
        batch = max(1, min(self.batch_size, shards.samples // (world * workers)))
        return ShardStream(
            shards,
            transform=EvalTransform(self.image_size, self.mean, self.std),
            batch_size=batch,
            epoch=0,
            resampled=False,
            epoch_samples=None,
            shuffle_buffer=0,
            **self._common(rank, world, workers),
        )

    def _common(self, rank: int, world: int, workers: int) -> dict:
        return dict(
            tokenizer=self.tokenizer,
            context_length=self.context_length,
            seed=self.seed,
            rank=rank,
            world=world,
            workers=workers,
            image_keys=self.image_keys,
            caption_key=self.caption_key,
        )

    def _require_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("ShardDataModule.attach(tokenizer, image_size, context_length) was not called")

    def started_epoch(self, train: bool, stream: ShardStream) -> None:
        if train:
            by_worker = sorted(stream.plans, key=lambda p: p.worker)
            self._quota = [p.batches for p in by_worker]
            skipped = sum(p.skip_batches for p in stream.plans)
            corrupt = [p.skip_corrupt for p in by_worker]
            self._trained = {"epoch": stream.epoch, "batches": skipped, "corrupt": corrupt}
            self._resume = None

    def train_dataloader(self):
        return EpochLoader(self, train=True)

    def val_dataloader(self):
        return EpochLoader(self, train=False) if self.validation_shards else []

    # Resume position: counted as batches reach the model, saved in checkpoints by Lightning.
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            # The worker that made this batch, by the loader's round robin: its dropped samples are part of
            # the position a resume skips to.
            worker = next_worker(self._quota, self._trained["batches"])
            self._trained["corrupt"][worker] += int(batch.get("corrupt", 0))
            self._trained["batches"] += 1
        return batch

    def state_dict(self) -> dict:
        return dict(self._trained)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
