"""Reading a URL list (parquet, csv, tsv, jsonl, txt, a folder of lists, or a folder of images with .txt
captions) as a stream of record batches, in bounded memory: LAION-scale lists are billions of rows. Every
column check happens when the list is opened, from the files' schemas; img2dataset's key scheme is here too."""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import StageError

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RESERVED = {
    "key",
    "status",
    "reason",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
    "duplicate_of",
}
BATCH_ROWS = 1 << 16  # rows per batch from parquet and image folders
BLOCK_BYTES = 4 << 20  # bytes per block from csv, jsonl and txt; csv and jsonl types are guessed from the first


class InputError(StageError):
    """Bad input: the message names the file or column and what was expected."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)


def _castable_to_text(t: pa.DataType) -> bool:
    """Types a caption may have: text, or scalars that `cast` writes as text (a csv of numbered captions)."""
    if pa.types.is_dictionary(t):
        return _castable_to_text(t.value_type)
    return _is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


@dataclass
class _File:
    path: str
    fmt: str
    schema: pa.Schema  # the file's own columns, as its reader returns them


def _format_of(path: str, input_format: str) -> str:
    if input_format != "auto":
        if input_format not in FORMATS:
            raise InputError(f"input_format={input_format!r}; expected auto or one of {', '.join(FORMATS)}")
        return input_format
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(
            f"cannot tell the format of {path} from its extension; set input_format to one of {', '.join(FORMATS)}"
        )
    return EXTENSIONS[ext]


def _read_error(path: str, fmt: str, err: BaseException) -> InputError:
    message = _first_line(err)
    if "UTF8" in message or "UTF-8" in message or isinstance(err, UnicodeDecodeError):
        return InputError(f"input {path} is not UTF-8 text ({message})")
    return InputError(f"cannot read {path} as {fmt}: {message}")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _open_binary(path: str):
    """A local file, or any fsspec URL (`s3://bucket/urls.parquet`), opened for reading bytes."""
    return fsspec.open(path, "rb").open() if _is_remote(path) else open(path, "rb")


def _open_reader(path: str, fmt: str, text_columns: list[str], block_bytes: int):
    """A streaming reader: csv and jsonl readers read (and type) their first block here."""
    source = _open_binary(path) if _is_remote(path) else path
    if fmt == "parquet":
        return pq.ParquetFile(source)
    if fmt in ("csv", "tsv"):
        # The url and caption columns are text whatever the first block looks like ("123" is no number here).
        return pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}),
        )
    return pajson.open_json(source, read_options=pajson.ReadOptions(block_size=block_bytes))


def _schema_of(path: str, fmt: str, text_columns: list[str], block_bytes: int) -> pa.Schema:
    if fmt == "txt":
        return pa.schema([("url", pa.string())])
    try:
        with _open_reader(path, fmt, text_columns, block_bytes) as reader:
            schema = reader.schema_arrow if fmt == "parquet" else reader.schema
    except (pa.ArrowException, OSError) as err:
        raise _read_error(path, fmt, err) from err
    if fmt in ("csv", "tsv"):
        # The csv reader types a column as binary exactly when its first block is not valid UTF-8.
        binary = [f.name for f in schema if pa.types.is_binary(f.type)]
        if binary:
            raise InputError(f"input {path} is not UTF-8 text (column {binary[0]!r})")
    return schema


def _lines(path: str, block_bytes: int) -> Iterator[pa.Array]:
    """A txt file's non-blank lines, stripped, a block of whole lines at a time."""
    with _open_binary(path) as f:
        carry = b""
        while block := f.read(block_bytes):
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield _split_lines(data[:cut])
        if carry:
            yield _split_lines(carry)


def _split_lines(data: bytes) -> pa.Array:
    lines = pc.list_flatten(pc.split_pattern(pa.array([data], pa.large_binary()), "\n"))
    lines = pc.utf8_trim_whitespace(lines.cast(pa.large_string()))  # the cast checks UTF-8
    return lines.filter(pc.greater(pc.binary_length(lines), 0)).cast(pa.string())


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names), sorted, one folder at a time: an image folder is never listed whole."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        yield folder, sorted(files)


def _caption(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as err:
        raise InputError(f"caption file {path} is not UTF-8 text") from err


def _image_batches(root: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """file:// URLs for every image under `root`, each with the text of its sidecar `.txt` as caption."""
    urls, captions = [], []
    for folder, files in _walk(root):
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            # as_uri percent-escapes '#', '?' and '%', which the fetcher's yarl.URL(url).path decodes back.
            urls.append(pathlib.Path(folder, name).as_uri())
            sidecar = stem + ".txt"
            captions.append(_caption(os.path.join(folder, sidecar)) if sidecar in names else None)
            if len(urls) == batch_rows:
                yield _image_batch(urls, captions)
                urls, captions = [], []
    if urls:
        yield _image_batch(urls, captions)


def _image_batch(urls: list[str], captions: list[str | None]) -> pa.RecordBatch:
    return pa.record_batch([pa.array(urls, pa.string()), pa.array(captions, pa.string())], ["url", "caption"])


def fingerprint_files(paths: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        with _open_binary(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class UrlList:
    """An opened input: `schema` (`url`, `caption`, then the extra columns), `batches()` (record batches of
    that schema, in input order, a bounded number of rows at a time), `local_root` (the folder file:// URLs
    may read from: image-folder inputs only) and `fingerprint` (a hash of the input's bytes)."""

    def __init__(self, files: list[_File], sources: list[str | None], schema: pa.Schema, **options):
        self.files, self.sources, self.schema = files, sources, schema
        self.image_root: str | None = options["image_root"]
        self.local_root = self.image_root
        self.batch_rows, self.block_bytes = options["batch_rows"], options["block_bytes"]

    @cached_property
    def fingerprint(self) -> str:
        if self.image_root:
            return fingerprint_files(os.path.join(d, f) for d, files in _walk(self.image_root) for f in files)
        return fingerprint_files(f.path for f in self.files)

    def batches(self) -> Iterator[pa.RecordBatch]:
        if self.image_root:
            yield from _image_batches(self.image_root, self.batch_rows)
            return
        for file in self.files:
            try:
                for batch in self._raw_batches(file):
                    if batch.num_rows:
                        yield self._convert(batch)
            except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
                raise _read_error(file.path, file.fmt, err) from err

    def _raw_batches(self, file: _File) -> Iterator[pa.RecordBatch]:
        if file.fmt == "txt":
            for urls in _lines(file.path, self.block_bytes):
                yield pa.record_batch([urls], ["url"])
            return
        text = [c for c in self.sources[:2] if c]
        with _open_reader(file.path, file.fmt, text, self.block_bytes) as reader:
            if file.fmt == "parquet":
                present = [c for c in self.sources if c and c in file.schema.names]
                # One reader per row group: one over the whole file keeps memory that grows with the file
                # (pyarrow 25: ~100 MB of Arrow allocations after 5M rows, against a flat 14 MB this way).
                for group in range(reader.num_row_groups):
                    yield from reader.iter_batches(batch_size=self.batch_rows, row_groups=[group], columns=present)
            else:
                yield from reader

    def _convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """A file's batch in the list's schema: renamed, cast (unified types), missing columns as nulls."""
        arrays = []
        for source, field in zip(self.sources, self.schema):
            index = batch.schema.get_field_index(source) if source else -1
            column = batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, field.type)
            arrays.append(column if column.type == field.type else column.cast(field.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def open_input(
    path: str,
    input_format: str = "auto",
    url_col: str = "url",
    caption_col: str | None = "caption",
    extra_columns: list[str] | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    block_bytes: int = BLOCK_BYTES,
) -> UrlList:
    """Open the input and check its columns; nothing but schemas (and csv/jsonl first blocks) is read yet.
    A local path or any fsspec URL (a file, or a folder of lists; folders of images must be local)."""
    path = str(path)
    if _is_remote(path):
        image_root, files = None, _remote_files(path, input_format, url_col, caption_col, block_bytes)
    else:
        path = os.path.abspath(os.path.expanduser(path))
        image_root, files = _local_files(path, input_format, url_col, caption_col, block_bytes)
    if image_root:
        url_col, caption_col = "url", "caption"
        schemas = [pa.schema([("url", pa.string()), ("caption", pa.string())])]
    if files:
        for file in files:
            _check_file(file, url_col, caption_col, extra_columns)
        schemas = [f.schema for f in files]
    names = list(dict.fromkeys(name for schema in schemas for name in schema.names))
    # A name twice in one file is a column the crawl drops (`_check_file` refused the others): not unified.
    single = [pa.schema([f for f in s if s.names.count(f.name) == 1]) for s in schemas]
    try:
        columns = pa.unify_schemas(single, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise InputError(f"the URL lists in {path} have incompatible columns: {_first_line(err)}") from err
    if caption_col is not None and caption_col not in names:
        if names == ["url"]:
            caption_col = None  # a bare list of URLs, e.g. a .txt file
        else:
            raise InputError(
                f"input {path} has no column {caption_col!r} (columns: {', '.join(names)}); set "
                f"caption_col, or caption_col=null"
            )
    others = [c for c in names if c not in (url_col, caption_col)]
    if extra_columns is not None:
        missing = [c for c in extra_columns if c not in names]
        if missing:
            raise InputError(f"extra_columns {missing} are not in input {path} (columns: {', '.join(names)})")
        others = [c for c in extra_columns if c not in (url_col, caption_col)]
    clash = sorted(set(others) & (RESERVED | {"url", "caption"}))
    if clash:
        raise InputError(
            f"input column(s) {clash} clash with crawl output columns; rename them, or list the columns to keep "
            f"in extra_columns"
        )
    schema = pa.schema(
        [("url", pa.string()), ("caption", pa.string())] + [columns.field(c).with_nullable(True) for c in others]
    )
    options = {"image_root": image_root, "batch_rows": batch_rows, "block_bytes": block_bytes}
    return UrlList(files, [url_col, caption_col, *others], schema, **options)


def _remote_files(path: str, input_format: str, url_col: str, caption_col: str | None, block_bytes: int):
    """An fsspec URL: one list, or a folder of lists (folders of images must be local)."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise InputError(f"input {path} does not exist")
    if not fs.isdir(root):
        return [_open_file(path, input_format, url_col, caption_col, block_bytes)]
    lists = [fs.unstrip_protocol(p) for p in sorted(fs.ls(root, detail=False)) if _listed(p)]
    if not lists:
        raise InputError(
            f"input folder {path} holds no URL lists ({', '.join(EXTENSIONS)}; image folders must be local)"
        )
    return [_open_file(f, input_format, url_col, caption_col, block_bytes) for f in lists]


def _local_files(path: str, input_format: str, url_col: str, caption_col: str | None, block_bytes: int):
    """(image folder or None, the lists): a list file, a folder of lists, or a folder of images."""
    if not os.path.exists(path):
        raise InputError(f"input {path} does not exist")
    if not os.path.isdir(path):
        return None, [_open_file(path, input_format, url_col, caption_col, block_bytes)]
    lists = [os.path.join(path, e) for e in sorted(os.listdir(path)) if _listed(e)]
    if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for _, fs in _walk(path) for f in fs):
        return path, []
    if not lists:
        raise InputError(f"input folder {path} holds neither URL lists ({', '.join(EXTENSIONS)}) nor images")
    return None, [_open_file(f, input_format, url_col, caption_col, block_bytes) for f in lists]


def _listed(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def _open_file(path: str, input_format: str, url_col: str, caption_col: str | None, block_bytes: int) -> _File:
    fmt = _format_of(path, input_format)
    return _File(path, fmt, _schema_of(path, fmt, [c for c in (url_col, caption_col) if c], block_bytes))


def _check_file(file: _File, url_col: str, caption_col: str | None, extra_columns: list[str] | None) -> None:
    """What one file of the list must be: a url column of text, once; a caption that reads as text."""
    names = file.schema.names
    if url_col not in names:
        raise InputError(f"input {file.path} has no column {url_col!r} (columns: {', '.join(names)}); set url_col")
    kept = [url_col, caption_col, *(extra_columns if extra_columns is not None else names)]
    for name in dict.fromkeys(c for c in kept if c):
        if names.count(name) > 1:
            raise InputError(f"input {file.path} has {names.count(name)} columns named {name!r}")
    url_type = file.schema.field(url_col).type
    if not _is_text(url_type) and not (pa.types.is_dictionary(url_type) and _is_text(url_type.value_type)):
        raise InputError(f"column {url_col!r} of input {file.path} holds {url_type}; expected one URL string a row")
    if caption_col in names and not _castable_to_text(file.schema.field(caption_col).type):
        raise InputError(
            f"column {caption_col!r} of input {file.path} holds {file.schema.field(caption_col).type}; expected text"
        )


def key_digits(number_sample_per_shard: int) -> int:
    """Digits of the index-in-shard part of a key (img2dataset's `oom_sample_per_shard`)."""
    return math.ceil(math.log10(number_sample_per_shard)) if number_sample_per_shard > 1 else 0


def make_key(row: int, number_sample_per_shard: int) -> str:
    """img2dataset's key: shard id, then index in shard, zero-padded to 5 + key_digits digits."""
    shard, index = divmod(row, number_sample_per_shard)
    digits = key_digits(number_sample_per_shard)
    return f"{shard * 10**digits + index:0{5 + digits}d}"
