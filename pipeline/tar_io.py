"""Webdataset tars, read and written the same way by every stage.

A sample is `{"__key__": key, ext: bytes, ...}`; in the tar, one member `{key}.{ext}` per extension, a
sample's members next to each other (webdataset's grouping). Members are written with a fixed mtime, owner
and mode, so the same samples always give the same bytes, and so the same content hash.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

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
    place and returns its sha256, taken while writing."""

    def __init__(self, location: Location, name: str):
        self._cm = location.open_atomic(name)
        self._file = HashingWriter(self._cm.__enter__())
        # Plain tarfile, not webdataset.TarWriter: that import pulls in torch, a second and ~300 MB per worker.
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext == "__key__":
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> str:
        self._tar.close()
        self._cm.__exit__(None, None, None)
        return self._file.hexdigest()

    def abort(self) -> None:
        try:
            self._tar.close()
        finally:
            self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)


class HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
