"""Reading a URL list (parquet, csv, tsv, jsonl, txt, or a folder of images with .txt captions) and cutting
it into shards, with img2dataset's key scheme and every duplicate URL pointed at its first occurrence."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
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


class InputError(StageError):
    """Bad input: the message names the file or column and what was expected."""


def _read_file(path: str, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        if fmt == "jsonl":
            return pajson.read_json(path)
        with open(path, encoding="utf-8") as f:
            urls = [line.strip() for line in f if line.strip()]
        return pa.table({"url": pa.array(urls, pa.string())})
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path} as {fmt}: {str(err).splitlines()[0]}") from err


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


def _image_folder(folder: str) -> pa.Table:
    """file:// URLs for every image under `folder`, each with the text of its sidecar `.txt` as caption."""
    urls, captions = [], []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.abspath(os.path.join(root, name))
            sidecar = os.path.join(root, stem + ".txt")
            caption = None
            if os.path.exists(sidecar):
                with open(sidecar, encoding="utf-8") as f:
                    caption = f.read().strip()
            urls.append("file://" + path)
            captions.append(caption)
    return pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})


def fingerprint_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_input(
    path: str,
    input_format: str = "auto",
    url_col: str = "url",
    caption_col: str | None = "caption",
    extra_columns: list[str] | None = None,
) -> tuple[pa.Table, str | None, str]:
    """The input as a table with `url`, `caption` and the extra columns, the folder that file:// URLs may
    read from (image-folder inputs only), and a fingerprint of the input's bytes."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise InputError(f"input {path} does not exist")
    local_root = None
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        lists = [os.path.join(path, e) for e in entries if os.path.splitext(e)[1].lower() in EXTENSIONS]
        has_images = any(os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS for _, _, fs in os.walk(path) for e in fs)
        if has_images:
            table, local_root, url_col, caption_col = _image_folder(path), path, "url", "caption"
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
        elif lists:
            files = lists
            tables = [_read_file(f, _format_of(f, input_format)) for f in files]
            try:
                table = pa.concat_tables(tables, promote_options="permissive")
            except pa.ArrowInvalid as err:
                raise InputError(f"the URL lists in {path} have incompatible columns: {err}") from err
        else:
            raise InputError(f"input folder {path} holds neither URL lists ({', '.join(EXTENSIONS)}) nor images")
    else:
        files = [path]
        table = _read_file(path, _format_of(path, input_format))
    if url_col not in table.column_names:
        raise InputError(
            f"input {path} has no column {url_col!r} (columns: {', '.join(table.column_names)}); set url_col"
        )
    if caption_col is not None and caption_col not in table.column_names:
        if table.column_names == ["url"]:
            caption_col = None  # a bare list of URLs, e.g. a .txt file
        else:
            raise InputError(
                f"input {path} has no column {caption_col!r} (columns: {', '.join(table.column_names)}); set "
                f"caption_col, or caption_col=null"
            )
    others = [c for c in table.column_names if c not in (url_col, caption_col)]
    if extra_columns is not None:
        missing = [c for c in extra_columns if c not in table.column_names]
        if missing:
            raise InputError(
                f"extra_columns {missing} are not in input {path} (columns: {', '.join(table.column_names)})"
            )
        others = [c for c in extra_columns if c not in (url_col, caption_col)]
    clash = sorted(set(others) & (RESERVED | {"url", "caption"}))
    if clash:
        raise InputError(
            f"input column(s) {clash} clash with crawl output columns; rename them, or list the columns to keep "
            f"in extra_columns"
        )
    columns = {
        "url": pc.cast(table[url_col], pa.string()),
        "caption": pc.cast(table[caption_col], pa.string()) if caption_col else pa.nulls(table.num_rows, pa.string()),
    }
    columns.update({c: table[c] for c in others})
    return pa.table(columns), local_root, fingerprint_files(files)


def key_digits(number_sample_per_shard: int) -> int:
    """Digits of the index-in-shard part of a key (img2dataset's `oom_sample_per_shard`)."""
    return math.ceil(math.log10(number_sample_per_shard)) if number_sample_per_shard > 1 else 0


def make_key(row: int, number_sample_per_shard: int) -> str:
    """img2dataset's key: shard id, then index in shard, zero-padded to 5 + key_digits digits."""
    shard, index = divmod(row, number_sample_per_shard)
    digits = key_digits(number_sample_per_shard)
    return f"{shard * 10**digits + index:0{5 + digits}d}"


def plan(table: pa.Table, number_sample_per_shard: int) -> list[pa.Table]:
    """Cut the input into shards of consecutive rows; add `key` and `duplicate_of` (the key of the first row
    with the same URL, or null). Duplicates keep their place and key, so no input row is lost."""
    n = table.num_rows
    keys = [make_key(r, number_sample_per_shard) for r in range(n)]
    urls = pc.fill_null(table["url"], "")
    # dictionary_encode numbers distinct URLs in order of first appearance, so a row is a first
    # occurrence exactly when its code exceeds every code before it.
    codes = pc.dictionary_encode(urls).combine_chunks().indices.to_numpy(zero_copy_only=False)
    if n:
        running = np.maximum.accumulate(codes)
        first = np.concatenate([[True], codes[1:] > running[:-1]])
        first_row = np.flatnonzero(first)[codes]
    else:
        first_row = np.zeros(0, dtype=np.int64)
    empty = pc.equal(urls, "").to_numpy(zero_copy_only=False)
    duplicate_of = [None if (first_row[r] == r or empty[r]) else keys[first_row[r]] for r in range(n)]
    full = table.append_column("key", pa.array(keys, pa.string())).append_column(
        "duplicate_of", pa.array(duplicate_of, pa.string())
    )
    return [full.slice(start, number_sample_per_shard) for start in range(0, n, number_sample_per_shard)]
