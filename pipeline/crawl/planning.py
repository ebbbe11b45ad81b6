"""Cutting a URL list of any length into shard plan files in bounded memory, every repeated URL pointed at
its first occurrence exactly.

`write_plan` makes three passes, none holding more than a batch, a partition or a window:
1. stream the input: every row goes to one spill file (in order), and (row, hash, url) of every non-empty URL
   to one of FANOUT hash partitions, so that equal URLs always share a partition;
2. per partition, find each URL's first row (rows are in input order within a partition); a partition over
   the byte budget is split again on the next bits of the same 64-bit hash; the (row, first row) pairs of
   the repeats go to files by row window;
3. stream the spill again, look each row's first row up in its window's dense array, and write the shard
   plan files with `key` and `duplicate_of`.
A probabilistic filter would be smaller, but a false positive would mark a new URL as a repeat and lose it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import Iterable
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.crawl.inputs import key_digits
from pipeline.crawl.shard_writer import shard_name
from pipeline.storage import Location

FANOUT_BITS = 6  # at most 8: partition numbers are sorted as uint8
FANOUT = 1 << FANOUT_BITS  # partitions per level: 64 open files at most while splitting
MAX_DEPTH = 64 // FANOUT_BITS  # levels of hash bits; below that, equal hashes mean (almost surely) equal URLs
BUDGET = 48 << 20  # URL bytes of one partition handled in memory (peak ≈ 4× that: hash table, codes, rows)
WINDOW = 1 << 20  # rows per window of the (row → first row) lookup: 8 MB dense
ROW_GROUP = 1 << 16  # rows per row group of a plan file (small batches are joined up to this)
SINK_PAIRS = 1 << 18  # repeats buffered before they go to their windows' files (4 MB)
PART_SCHEMA = pa.schema([("row", pa.int64()), ("hash", pa.uint64()), ("url", pa.string())])

_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def _fmix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser: every output bit depends on every input bit, so any 6 bits partition well."""
    x ^= x >> np.uint64(33)
    x *= _C1
    x ^= x >> np.uint64(33)
    x *= _C2
    x ^= x >> np.uint64(33)
    return x


def hash_urls(urls: pa.Array) -> np.ndarray:
    """A 64-bit hash of each (non-empty, non-null) string, vectorised over its bytes 8 at a time: equal
    strings, equal hashes; only the partitions' balance depends on its quality, never the result."""
    urls = urls.cast(pa.string())
    offsets = np.frombuffer(urls.buffers()[1], np.int32, len(urls) + 1, urls.offset * 4).astype(np.int64)
    data = urls.buffers()[2]
    size = data.size
    if size < 8:
        data, size = np.frombuffer(data.to_pybytes() + bytes(8), np.uint8), 8
    # An unaligned uint64 view starting at every byte of the data buffer.
    words_at = np.ndarray(shape=(size - 7,), dtype=np.uint64, buffer=data, offset=0, strides=(1,))
    lengths = np.diff(offsets)
    count = (lengths + 7) >> 3  # words per string
    ends = np.cumsum(count)
    firsts = ends - count
    pos = np.arange(0, 8 * int(ends[-1]), 8, dtype=np.int64) - np.repeat(8 * firsts - offsets[:-1], count)
    limit = size - 8
    words = words_at[np.minimum(pos, limit)]
    tail = int(np.searchsorted(pos, limit, "right"))  # words that would read past the buffer: read earlier, shift
    if tail < len(pos):
        words[tail:] >>= np.uint64(8) * (pos[tail:] - limit).astype(np.uint64)
    last = (lengths - 8 * (count - 1)).astype(np.uint64)  # bytes of each string's last word
    words[ends - 1] &= np.where(last == 8, _ONES, (np.uint64(1) << (last << np.uint64(3))) - np.uint64(1))
    words *= _C1
    words ^= words >> np.uint64(29)
    return _fmix(np.add.reduceat(words, firsts) ^ lengths.astype(np.uint64))


def make_keys(rows: np.ndarray, number_sample_per_shard: int) -> pa.Array:
    """`inputs.make_key` for many rows at once."""
    digits = key_digits(number_sample_per_shard)
    values = (rows // number_sample_per_shard) * 10**digits + rows % number_sample_per_shard
    return pc.utf8_lpad(pa.array(values, pa.int64()).cast(pa.string()), 5 + digits, "0")


class _Partitions:
    """FANOUT Arrow IPC files of (row, hash, url), split on hash bits [shift, shift + FANOUT_BITS)."""

    def __init__(self, prefix: str, shift: int):
        self.paths = [f"{prefix}.{i:02d}" for i in range(FANOUT)]
        self.shift = np.uint64(shift)
        self.rows, self.bytes = [0] * FANOUT, [0] * FANOUT
        self.stack = ExitStack()
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, batch: pa.RecordBatch) -> None:
        part = ((batch.column(1).to_numpy() >> self.shift) & np.uint64(FANOUT - 1)).astype(np.uint8)
        order = np.argsort(part, kind="stable")  # stable (a radix sort on uint8): rows keep their input order
        counts = np.bincount(part, minlength=FANOUT)
        ordered = batch.take(pa.array(order))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i in np.flatnonzero(counts):
            piece = ordered.slice(offsets[i], counts[i])
            if i not in self.writers:
                sink = self.stack.enter_context(pa.OSFile(self.paths[i], "wb"))
                self.writers[i] = self.stack.enter_context(pa.ipc.new_stream(sink, PART_SCHEMA))
            self.writers[i].write_batch(piece)
            self.rows[i] += piece.num_rows
            self.bytes[i] += piece.column(2).nbytes

    def close(self) -> list[tuple[str, int, int]]:
        self.stack.close()
        return [(self.paths[i], self.rows[i], self.bytes[i]) for i in sorted(self.writers)]


class _Repeats:
    """(row, first row) of every repeat, buffered, then appended to one raw int64 file per row window."""

    def __init__(self, folder: str, window: int):
        self.folder, self.window = folder, window
        self.pending: list[np.ndarray] = []
        self.count = 0
        os.makedirs(folder, exist_ok=True)

    def path(self, w: int) -> str:
        return os.path.join(self.folder, f"{w}.bin")

    def add(self, rows: np.ndarray, firsts: np.ndarray) -> None:
        if len(rows):
            self.pending.append(np.column_stack([rows, firsts]).astype(np.int64))
            self.count += len(rows)
            if self.count >= SINK_PAIRS:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pairs = np.concatenate(self.pending)
        self.pending, self.count = [], 0
        windows = pairs[:, 0] // self.window
        order = np.argsort(windows, kind="stable")
        pairs, windows = pairs[order], windows[order]
        bounds = np.flatnonzero(np.diff(windows)) + 1
        for chunk in np.split(pairs, bounds):
            with open(self.path(int(chunk[0, 0] // self.window)), "ab") as f:
                chunk.tofile(f)


class _TooManyDistinct(Exception):
    pass


def _first_rows(urls: pa.Array, rows: np.ndarray) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The distinct URLs of a chunk (in order of first appearance), each one's first row, and each row's code."""
    encoded = pc.dictionary_encode(urls)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    # dictionary_encode numbers distinct URLs in order of first appearance, so a row is a first
    # occurrence exactly when its code exceeds every code before it.
    running = np.maximum.accumulate(codes)
    new = np.concatenate([[True], codes[1:] > running[:-1]])
    return encoded.dictionary, rows[np.flatnonzero(new)], codes


def _dedup(path: str, repeats: _Repeats, chunk_bytes: float, seen_limit: float) -> None:
    """Find the first row of every URL of one partition file, `chunk_bytes` of URLs at a time. Past the first
    chunk, the URLs seen so far are kept (once each) to look later chunks up in; more than `seen_limit`
    bytes of them → _TooManyDistinct. Pairs sent before that are true, and sending them again is harmless."""
    seen_urls, seen_rows = pa.array([], pa.string()), np.zeros(0, np.int64)
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_stream(source)
        pending, size = [], 0
        for batch in itertools.chain(reader, [None]):  # None: the end, the last chunk
            if batch is not None:
                pending.append(batch)
                size += batch.column(2).nbytes
                if size < chunk_bytes:
                    continue
            if not pending:
                break
            chunk = pa.Table.from_batches(pending, PART_SCHEMA).combine_chunks()
            pending, size = [], 0
            rows = chunk.column("row").to_numpy()
            distinct, firsts, codes = _first_rows(chunk.column("url").chunk(0), rows)
            if len(seen_urls):
                found = pc.fill_null(pc.index_in(distinct, value_set=seen_urls), -1).to_numpy().astype(np.int64)
                known = found >= 0
                firsts = np.where(known, seen_rows[np.maximum(found, 0)], firsts)
                distinct, fresh = distinct.filter(pa.array(~known)), firsts[~known]
            else:
                fresh = firsts
            if batch is not None:  # more chunks to come: remember this one's new URLs
                seen_urls = pa.concat_arrays([seen_urls, distinct.cast(pa.string())])
                seen_rows = np.concatenate([seen_rows, fresh])
                if seen_urls.nbytes > seen_limit:
                    raise _TooManyDistinct
            first = firsts[codes]
            repeat = first != rows
            repeats.add(rows[repeat], first[repeat])


def _split(path: str, depth: int) -> list[tuple[str, int, int]]:
    parts = _Partitions(path, depth * FANOUT_BITS)
    with pa.OSFile(path, "rb") as source:
        for batch in pa.ipc.open_stream(source):
            parts.add(batch)
    os.remove(path)
    return parts.close()


def _dedup_all(parts: list[tuple[str, int, int]], repeats: _Repeats, budget: int) -> None:
    """Pass 2. A split partition's file goes at once, so partitions never take more disk than the URLs."""
    todo = [(path, rows, size, 1, sum(r for _, r, _ in parts)) for path, rows, size in parts]
    while todo:
        path, rows, size, depth, parent_rows = todo.pop()
        if size <= budget:
            _dedup(path, repeats, float("inf"), float("inf"))
            os.remove(path)
            continue
        if depth >= MAX_DEPTH or 2 * rows > parent_rows:
            # Bits exhausted, or one partition kept most of its parent's rows: few URLs repeated very often,
            # which splitting cannot spread. Chunks against the URLs seen so far handle them in one pass.
            try:
                limit = float("inf") if depth >= MAX_DEPTH else budget / 2
                _dedup(path, repeats, budget / 4, limit)
                os.remove(path)
                continue
            except _TooManyDistinct:
                pass
        todo.extend((p, r, s, depth + 1, rows) for p, r, s in _split(path, depth))


class _Firsts:
    """Each row's first row (-1: none), window by window, in row order; a window's file goes once read."""

    def __init__(self, repeats: _Repeats):
        self.repeats, self.window = repeats, repeats.window
        self.current, self.dense = -1, np.zeros(0, np.int64)

    def get(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, np.int64)
        done = 0
        while done < count:
            row = start + done
            w = row // self.window
            if w != self.current:
                self._load(w)
            take = min(count - done, (w + 1) * self.window - row)
            offset = row - w * self.window
            out[done : done + take] = self.dense[offset : offset + take]
            done += take
        return out

    def _load(self, w: int) -> None:
        self.current, self.dense = w, np.full(self.window, -1, np.int64)
        path = self.repeats.path(w)
        if os.path.exists(path):
            pairs = np.fromfile(path, np.int64).reshape(-1, 2)
            self.dense[pairs[:, 0] - w * self.window] = pairs[:, 1]
            os.remove(path)


class _ShardWriter:
    """One plan file at a time, written atomically, small pieces joined into row groups of ROW_GROUP rows."""

    def __init__(self, work: Location, schema: pa.Schema):
        self.work, self.schema = work, schema
        self.stack: ExitStack | None = None
        self.pieces: list[pa.RecordBatch] = []
        self.rows = self.duplicates = 0

    def add(self, shard: int, columns: list[pa.Array], duplicates: int) -> None:
        piece = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        self.duplicates += duplicates
        if self.stack is None:
            self.stack = ExitStack()
            f = self.stack.enter_context(self.work.open_atomic(f"{shard_name(shard)}.parquet"))
            # No dictionaries: keys and URLs are (nearly) all distinct, and trying costs most of the write.
            self.writer = self.stack.enter_context(pq.ParquetWriter(f, self.schema, use_dictionary=False))
        self.pieces.append(piece)
        self.rows += piece.num_rows
        if self.rows >= ROW_GROUP:
            self._write()

    def _write(self) -> None:
        if self.pieces:
            self.writer.write_table(pa.Table.from_batches(self.pieces, self.schema), row_group_size=ROW_GROUP)
        self.pieces, self.rows = [], 0

    def close(self) -> None:
        if self.stack is not None:
            self._write()
            self.stack.close()  # closes the parquet writer, then renames the file into place
            self.stack = None

    def abort(self) -> None:
        """After an error: the half-written file is removed, never renamed into place."""
        if self.stack is not None:
            self.stack.__exit__(*sys.exc_info())
            self.stack = None


def write_plan(
    batches: Iterable[pa.RecordBatch],
    number_sample_per_shard: int,
    work: Location,
    spill_dir: str,
    budget: int = BUDGET,
    window: int = WINDOW,
) -> dict:
    """Write `{shard_name(i)}.parquet` under `work` for every shard of `number_sample_per_shard` consecutive
    rows: the input's columns, `key` (img2dataset's) and `duplicate_of` (the key of the first row with the
    same URL; null for first occurrences and null or empty URLs). `spill_dir` is a local folder, created if
    missing and removed at the end, error or not. Returns {"rows", "shards", "duplicates"}."""
    per = number_sample_per_shard
    os.makedirs(spill_dir, exist_ok=True)
    parts = _Partitions(os.path.join(spill_dir, "part"), 0)
    try:
        rows_path = os.path.join(spill_dir, "rows.arrow")
        n, schema = 0, None
        with ExitStack() as stack:
            for batch in batches:
                if schema is None:
                    schema = batch.schema
                    sink = stack.enter_context(pa.OSFile(rows_path, "wb"))
                    options = pa.ipc.IpcWriteOptions(compression="lz4")  # the spill is the whole list: keep it small
                    spill = stack.enter_context(pa.ipc.new_stream(sink, schema, options=options))
                spill.write_batch(batch)
                urls = batch.column("url")
                keep = pc.fill_null(pc.greater(pc.binary_length(urls), 0), False)
                rows = n + np.flatnonzero(keep.to_numpy(zero_copy_only=False))
                if len(rows):
                    urls = urls.filter(keep)
                    parts.add(pa.record_batch([pa.array(rows), pa.array(hash_urls(urls)), urls], schema=PART_SCHEMA))
                n += batch.num_rows
        repeats = _Repeats(os.path.join(spill_dir, "repeats"), window)
        _dedup_all(parts.close(), repeats, budget)
        repeats.flush()
        if schema is None:
            return {"rows": 0, "shards": 0, "duplicates": 0}
        duplicates = _write_shards(rows_path, schema, per, work, _Firsts(repeats))
        return {"rows": n, "shards": -(-n // per), "duplicates": duplicates}
    finally:
        parts.stack.close()  # after an error: the partition files' handles
        shutil.rmtree(spill_dir, ignore_errors=True)


def _write_shards(rows_path: str, schema: pa.Schema, per: int, work: Location, firsts: _Firsts) -> int:
    """Pass 3: the spill in order, cut at shard boundaries, with keys and `duplicate_of` added."""
    plan_schema = pa.schema([*schema, pa.field("key", pa.string()), pa.field("duplicate_of", pa.string())])
    writer = _ShardWriter(work, plan_schema)
    with pa.OSFile(rows_path, "rb") as source:
        try:
            _cut(pa.ipc.open_stream(source), per, firsts, writer)
        except BaseException:
            writer.abort()
            raise
    writer.close()
    return writer.duplicates


def _cut(batches, per: int, firsts: _Firsts, writer: _ShardWriter) -> None:
    start, null = 0, pa.scalar(None, pa.string())
    for batch in batches:
        done = 0
        while done < batch.num_rows:
            row = start + done
            shard = row // per
            take = min(batch.num_rows - done, (shard + 1) * per - row)
            first = firsts.get(row, take)
            repeat = first >= 0
            keys = make_keys(np.arange(row, row + take, dtype=np.int64), per)
            duplicate_of = pc.if_else(pa.array(repeat), make_keys(np.maximum(first, 0), per), null)
            writer.add(shard, [*batch.slice(done, take).columns, keys, duplicate_of], int(repeat.sum()))
            done += take
            if (row + take) % per == 0:
                writer.close()
        start += batch.num_rows
