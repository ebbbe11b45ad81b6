"""Where shards are read from: local paths, any fsspec URL (`s3://`, `gs://`, `https://`, `memory://`, …) and
webdataset's `pipe:` commands, with brace lists (`s3://bucket/shards/{00000..00999}.tar`) expanded.

One opener for training, its caption scan and evaluation, so that a location that works for one works for
all. Credentials and endpoints come from the environment, as fsspec/boto read them (`AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, …), so every loader worker and Ray worker sees the same.
"""

from __future__ import annotations

import fsspec
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander


def is_pipe(url: str) -> bool:
    return str(url).startswith("pipe:")


def open_shard(url: str):
    """A readable binary stream of one shard, read front to back."""
    if is_pipe(url):
        return wds.gopen(url)  # webdataset runs the command and reads its stdout
    return fsspec.open(url, "rb").open()


def shard_samples(urls, handler=wds.warn_and_continue):
    """webdataset samples (`__key__`, `__url__`, one entry per extension) of `urls` in order; a shard that
    cannot be opened is reported to `handler` (warn and continue, as for a corrupt member)."""

    def streams():
        for url in urls:
            try:
                yield {"url": url, "stream": open_shard(url)}
            except Exception as err:  # noqa: BLE001 (the handler decides)
                err.args = (*err.args, url)
                if not handler(err):
                    return

    return group_by_keys(tar_file_expander(streams(), handler=handler), handler=handler)


class Folder:
    """A folder on any fsspec filesystem, for listing and small reads; URLs keep the caller's scheme."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _full(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def isdir(self) -> bool:
        return self.fs.isdir(self.root)

    def files(self, suffix: str) -> list[str]:
        """URLs of the files directly in the folder whose names end with `suffix`, sorted."""
        return sorted(self._full(p) for p in self.fs.ls(self.root, detail=False) if p.endswith(suffix))

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}")

    def read_text(self, name: str) -> str:
        with self.fs.open(f"{self.root}/{name}", "r", encoding="utf-8") as f:
            return f.read()


def exists(url: str) -> bool:
    if is_pipe(url):
        return True  # a command: it says so when it runs
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def expand(pattern: str) -> list[str]:
    """A brace pattern's URLs (`{000..009}` ranges and `{a,b}` lists, webdataset's syntax), in order."""
    return list(expand_urls(pattern))
