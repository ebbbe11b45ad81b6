"""Webdataset tars, read and written the same way by every stage.

A sample is `{"__key__": key, ext: bytes, ...}`; in the tar, one member `{key}.{ext}` per extension, a
sample's members next to each other (webdataset's grouping). Members are written with a fixed mtime, owner
and mode, so the same samples always give the same bytes, and so the same content hash.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from contextlib import contextmanager

from pipeline.errors import DiskFullError, disk_full, is_disk_full
from pipeline.storage import Location


def iter_tar_samples(fileobj):
    """Samples of a tar stream, in order; members outside any sample (folders) are skipped."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample


def tar_index(fileobj) -> list[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of every member, from the headers alone (the file must seek)."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        return [(*m.name.rsplit("/", 1)[-1].partition(".")[::2], m.offset_data, m.size) for m in tar if m.isfile()]


class TarSampleWriter:
    """Streams samples into `name` under a temporary name (memory stays flat); `close()` renames it into
    place and returns its sha256, taken while writing. `size` (the tar's bytes, see `tar_size`) or `samples`
    (how many will be added) let a full disk's message say how much space the whole tar needs."""

    def __init__(self, location: Location, name: str, size: int | None = None, samples: int | None = None):
        self.location, self.name, self.size, self.expected = location, name, size, samples
        self._cm = location.open_atomic(name, size=size)
        self._file = HashingWriter(self._cm.__enter__())
        # Plain tarfile, not webdataset.TarWriter: that import pulls in torch, a second and ~300 MB per worker.
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, sample: dict) -> None:
        key = sample["__key__"]
        with self._naming_a_full_disk():
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> str:
        with self._naming_a_full_disk():
            self._tar.close()
        self._cm.__exit__(None, None, None)
        return self._file.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file; also after a full disk, when writing the tar's end would fail again."""
        self._file.discard()  # the end-of-archive blocks that close() writes go nowhere
        try:
            self._tar.close()
        finally:
            try:
                self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except DiskFullError:
                pass  # buffered bytes that no longer fit: the file is removed all the same

    @contextmanager
    def _naming_a_full_disk(self):
        """A full disk aborts, then names the tar with the space it needs: exact when `size` is known, else
        extrapolated from the bytes per sample so far to `samples`, else at least the bytes written so far."""
        try:
            yield
        except OSError as err:
            if not is_disk_full(err):
                raise
            self.abort()
            written, needed = self._file.bytes, self.size
            if needed is None and self.expected and self.samples:
                needed = max(written, written * self.expected // self.samples)
            at_least = needed is None
            raise disk_full(self.location.url_of(self.name), err, needed or written, at_least=at_least) from err


def tar_size(samples: list[dict]) -> int:
    """The bytes TarSampleWriter writes for `samples`: a 512-byte header and 512-byte blocks per member, two
    zero blocks, padded to tarfile's 10 kB records."""
    members = sum(512 + -(-len(v) // 512) * 512 for s in samples for k, v in s.items() if k != "__key__")
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class OrderedSampleWriter:
    """Writes samples in the order of their positions (0, 1, 2, ...) whatever order they arrive in, so that the
    same samples always make the same tar. `put(position, sample_or_None)` must be called once per position;
    None marks a position without a sample (a failed row). Samples that arrive ahead of their turn wait in
    memory up to `buffer_bytes`, then in a local spill file, so memory stays flat behind one slow row."""

    def __init__(self, writer: TarSampleWriter, buffer_bytes: int = 64 << 20):
        self.writer = writer
        self.buffer_bytes = buffer_bytes
        self.next = 0
        self.waiting: dict[int, dict | tuple[int, list[tuple[str, int]]] | None] = {}
        self.buffered = 0
        self.spill = None  # created on first overflow

    def put(self, position: int, sample: dict | None) -> None:
        if position != self.next:
            self.waiting[position] = self._hold(sample)
            return
        self._write(sample)
        self.next += 1
        while self.next in self.waiting:
            self._write(self._release(self.waiting.pop(self.next)))
            self.next += 1

    def _hold(self, sample: dict | None):
        if sample is None:
            return None
        size = sum(len(v) for k, v in sample.items() if k != "__key__")
        if self.buffered + size <= self.buffer_bytes:
            self.buffered += size
            return sample
        if self.spill is None:
            self.spill = tempfile.TemporaryFile(prefix="pixelmill-reorder-")
        self.spill.seek(0, io.SEEK_END)
        offset, parts = self.spill.tell(), []
        for ext, data in sample.items():
            if ext != "__key__":
                self.spill.write(data)
                parts.append((ext, len(data)))
        return (offset, [("__key__", sample["__key__"]), *parts])

    def _release(self, held) -> dict | None:
        if held is None or isinstance(held, dict):
            if held is not None:
                self.buffered -= sum(len(v) for k, v in held.items() if k != "__key__")
            return held
        offset, parts = held
        self.spill.seek(offset)
        (_, key), rest = parts[0], parts[1:]
        return {"__key__": key, **{ext: self.spill.read(size) for ext, size in rest}}

    def _write(self, sample: dict | None) -> None:
        if sample is not None:
            self.writer.add(sample)

    def close(self) -> str:
        """Every position must have been put; returns the tar's sha256."""
        if self.waiting:
            raise RuntimeError(f"positions {sorted(self.waiting)[:5]}... arrived but position {self.next} never did")
        self._drop_spill()
        return self.writer.close()

    def abort(self) -> None:
        self._drop_spill()
        self.writer.abort()

    def _drop_spill(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None


class HashingWriter:
    """A write-only file that hashes and counts what passes through it; after `discard()` it drops it."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        if self.file is None:
            return len(data)
        self.digest.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def discard(self) -> None:
        self.file = None

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
