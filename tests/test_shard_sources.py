"""Training shards from anywhere: a local folder, a brace list, webdataset `pipe:` commands and an fsspec
filesystem give the same shard sizes, and the same exact epoch (and the same resumed epoch) batch for batch."""

from __future__ import annotations

import os

import fsspec
import pytest
from torch.utils.data import DataLoader

from pipeline.world.shards import write_world_shards
from support import shard_stream
from training.data.shards import list_shards
from training.errors import UserError
from training.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = write_world_shards(tmp_path_factory.mktemp("shards"), 60, 20, image_size=24)
    memory = fsspec.filesystem("memory")
    for name in sorted(os.listdir(folder)):
        memory.pipe(f"/sources/{name}", open(os.path.join(folder, name), "rb").read())
    return {
        "folder": folder,
        "brace list": f"{folder}/{{00000..00002}}.tar",
        "pipe": f"pipe:cat {folder}/{{00000..00002}}.tar",  # sizes counted by reading each stream
        "fsspec": "memory://sources",
    }


def keys(path: str, skip_batches: int = 0) -> list[list[str]]:
    tokenizer = train_tokenizer(["a red circle", "two blue squares"], vocab_size=300, max_length=16)
    stream = shard_stream(path, tokenizer, epoch=1, seed=3, workers=2, skip_batches=skip_batches)
    return [b["keys"] for b in DataLoader(stream, batch_size=None, num_workers=2)]


def test_every_source_gives_the_same_sizes_and_the_same_epoch(sources):
    sizes = {name: list_shards(path).sizes for name, path in sources.items()}
    assert set(sizes.values()) == {(20, 20, 20)}
    epochs = {name: keys(path) for name, path in sources.items()}
    reference = epochs["folder"]
    assert sum(len(b) for b in reference) == 60
    assert all(epoch == reference for epoch in epochs.values())
    # A resumed epoch skips the batches it trained, wherever the shards are.
    assert keys(sources["fsspec"], skip_batches=4) == reference[4:]


def test_missing_remote_shards_are_named():
    with pytest.raises(UserError, match=r"shard memory://nowhere does not exist"):
        list_shards("memory://nowhere")
    with pytest.raises(UserError, match=r"shard memory://sources/00003\.tar does not exist \(1 missing\)"):
        list_shards("memory://sources/{00002..00003}.tar")
