"""Training checkpoints written the way every pipeline file is: whole under a temporary name beside the final
one, then renamed, so that `last.ckpt` is always the previous checkpoint or the new one, never a part of one.

Lightning's own save goes through an fsspec transaction, whose temporary file is in the system's temp folder:
on another filesystem the commit is a copy into `last.ckpt` itself, and a disk that fills mid-copy leaves a
truncated `last.ckpt` in place of the good one. A full disk here is a DiskFullError naming the checkpoint and
its size; the previous checkpoint stays, and the same command resumes from it."""

from __future__ import annotations

import io
import os
import uuid

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from training.errors import disk_full, is_disk_full


class AtomicCheckpointIO(TorchCheckpointIO):
    """`Trainer(plugins=[AtomicCheckpointIO()])`; object stores keep Lightning's save (a put is whole already)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # in memory first, as Lightning does: the size is known before writing
        path = os.path.abspath(str(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash then leaves the old file or this one
            os.replace(tmp, path)
        except OSError as err:
            if not is_disk_full(err):
                raise
            _remove(tmp)  # before measuring: the space it held is free again
            raise disk_full(path, err, buffer.tell()) from err
        finally:
            _remove(tmp)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
