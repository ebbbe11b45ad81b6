"""Eval sets in clip_benchmark's webdataset layout, read with `webdataset`:

<dir>/classnames.txt                        one class name per line (classification)
<dir>/zeroshot_classification_templates.txt optional, one template per line
<dir>/<split>/nshards.txt                   number of tars
<dir>/<split>/{0..n-1}.tar                  {key}.jpg|png|webp + {key}.cls (class index) or {key}.txt
                                            (captions, one per line: several per image allowed)
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from training.data.sources import Folder, exists, shard_samples
from training.errors import UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class EvalSet:
    path: str
    name: str
    shards: list[str]
    classnames: list[str] | None

    @classmethod
    def open(cls, path: str, split: str = "test", need_classnames: bool = False) -> EvalSet:
        """A local folder or any fsspec URL (`s3://bucket/evalsets/colour`)."""
        folder = Folder(str(path))
        if not folder.isdir():
            raise UserError(f"dataset={path} is not a folder (expected clip_benchmark's webdataset layout)")
        if not folder.exists(f"{split}/nshards.txt"):
            raise UserError(f"dataset={path} has no {split}/nshards.txt (expected clip_benchmark's webdataset layout)")
        count = int(folder.read_text(f"{split}/nshards.txt").strip())
        shards = [f"{folder.url}/{split}/{i}.tar" for i in range(count)]
        missing = [s for s in shards if not exists(s)]
        if missing:
            raise UserError(f"dataset={path}: {missing[0]} is missing ({split}/nshards.txt says {count})")
        classnames = None
        if folder.exists("classnames.txt"):
            classnames = [line.strip() for line in folder.read_text("classnames.txt").splitlines() if line.strip()]
        elif need_classnames:
            raise UserError(f"dataset={path} has no classnames.txt, which zero-shot classification needs")
        return cls(str(path), os.path.basename(os.path.normpath(str(path))), shards, classnames)

    def loader(self, transform, batch_size: int, num_workers: int) -> DataLoader:
        stream = _EvalStream(self.shards, transform)
        return DataLoader(
            stream, batch_size=batch_size, num_workers=min(num_workers, len(self.shards)), collate_fn=_collate
        )


class _EvalStream(IterableDataset):
    """Every sample once, in shard order; loader workers take whole shards."""

    def __init__(self, shards: list[str], transform):
        super().__init__()
        self.shards, self.transform = shards, transform

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = self.shards[info.id :: info.num_workers] if info else self.shards
        for sample in shard_samples(shards, handler=wds.reraise_exception):
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if data is None:
                raise UserError(f"sample {sample['__key__']} in {sample.get('__url__')} has no image")
            with Image.open(io.BytesIO(data)) as image:
                pixels = self.transform(image)
            label = int(sample["cls"].decode()) if "cls" in sample else -1
            captions = (
                [c.strip() for c in sample["txt"].decode("utf-8").splitlines() if c.strip()] if "txt" in sample else []
            )
            yield {"key": sample["__key__"], "pixels": pixels, "label": label, "captions": captions}


def _collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixels"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples]),
        "captions": [s["captions"] for s in samples],
        "keys": [s["key"] for s in samples],
    }
