"""Streaming URL lists and bounded-memory plans: exact dedup through spills and re-splits, one-line errors for
bad input, file URLs that name their own files."""

from __future__ import annotations

import asyncio
import collections
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from yarl import URL

import pipeline.crawl.planning as planning
from pipeline.crawl.fetch import Fetcher, FetchSettings
from pipeline.crawl.inputs import InputError, make_key, open_input
from pipeline.crawl.planning import hash_urls, make_keys, write_plan
from pipeline.storage import Location


def reference_duplicate_of(urls: list[str | None], per: int) -> list[str | None]:
    """The definition (the old in-memory plan's): the key of the first row with the same URL; null and empty
    URLs are never repeats."""
    first: dict[str, int] = {}
    out = []
    for row, url in enumerate(urls):
        if url and url in first:
            out.append(make_key(first[url], per))
        else:
            out.append(None)
            if url:
                first[url] = row
    return out


def plan_rows(tmp_path, batches, per: int, **options) -> tuple[dict, pa.Table]:
    """write_plan into a fresh folder; its counts and every plan file read back in shard order."""
    work = tmp_path / "work"
    work.mkdir()
    counts = write_plan(batches, per, Location(str(work)), str(tmp_path / "spill"), **options)
    assert not (tmp_path / "spill").exists()
    names = sorted(p.name for p in work.iterdir())
    assert names == [f"{i:05d}.parquet" for i in range(counts["shards"])]
    tables = [pq.read_table(work / name) for name in names]
    assert all(t.num_rows == per for t in tables[:-1])
    return counts, pa.concat_tables(tables) if tables else None


@pytest.fixture
def spy(monkeypatch):
    """How pass 2 handled partitions: split (at which depths), whole, in chunks, too many distinct for chunks."""
    calls = collections.Counter()
    split, dedup = planning._split, planning._dedup

    def counted_split(path, depth):
        calls["split"] += 1
        calls[f"depth {depth}"] += 1
        return split(path, depth)

    def counted_dedup(path, repeats, chunk_bytes, seen_limit):
        calls["whole" if chunk_bytes == float("inf") else "chunks"] += 1
        try:
            return dedup(path, repeats, chunk_bytes, seen_limit)
        except planning._TooManyDistinct:
            calls["too_many"] += 1
            raise

    monkeypatch.setattr(planning, "_split", counted_split)
    monkeypatch.setattr(planning, "_dedup", counted_dedup)
    return calls


@pytest.mark.parametrize("shape", ["deep", "shallow"])
def test_exact_dedup_through_spills_and_resplits(tmp_path, monkeypatch, spy, shape):
    if shape == "deep":  # 4 partitions a level: a tree 5 levels deep at this size
        monkeypatch.setattr(planning, "FANOUT_BITS", 2)
        monkeypatch.setattr(planning, "FANOUT", 4)
    else:  # no bits left below the first level: big partitions go in chunks against the URLs seen
        monkeypatch.setattr(planning, "MAX_DEPTH", 1)
    rng = random.Random(7)
    n = 12000
    # Repeats near and far (across batches, shards and windows), one URL in a fifth of the rows, nulls, empties.
    pool = [f"http://h{rng.randrange(50)}.example/{rng.randrange(10**6)}.jpg" for _ in range(4000)]
    urls = [
        rng.choice([None, "", "http://same.example/x.jpg", rng.choice(pool), f"http://u/{rng.randrange(10**9)}"])
        for _ in range(n)
    ]
    captions = [f"c{i}" for i in range(n)]
    table = pa.table({"url": pa.array(urls, pa.string()), "caption": captions, "n": np.arange(n)})
    per = 37
    counts, rows = plan_rows(tmp_path, table.to_batches(max_chunksize=101), per, budget=1000, window=1000)
    expected = reference_duplicate_of(urls, per)
    assert rows["duplicate_of"].to_pylist() == expected
    assert counts == {"rows": n, "shards": -(-n // per), "duplicates": sum(d is not None for d in expected)}
    assert rows["url"].to_pylist() == urls and rows["caption"].to_pylist() == captions  # every row once, in order
    assert rows["n"].to_pylist() == list(range(n))
    assert rows["key"].to_pylist() == [make_key(r, per) for r in range(n)]
    if shape == "deep":
        assert spy["depth 3"] >= 1 and spy["whole"] > 100 and spy["chunks"] >= 1  # split again and again
    else:
        assert spy["split"] == 0 and spy["chunks"] == 64


def test_a_heavy_url_with_many_others_splits_after_all(tmp_path, spy):
    """Over half the rows one URL: its partition is tried in chunks, holds too many distinct URLs, is split."""
    rng = random.Random(3)
    urls = [
        "http://heavy.example/a.jpg" if rng.random() < 0.6 else f"http://h/{rng.randrange(10**4)}" for _ in range(20000)
    ]
    batches = pa.table({"url": urls, "caption": urls}).to_batches(max_chunksize=500)
    _, rows = plan_rows(tmp_path, batches, 1000, budget=1000, window=3000)
    assert rows["duplicate_of"].to_pylist() == reference_duplicate_of(urls, 1000)
    assert spy["too_many"] == 1 and spy["chunks"] == 2 and spy["split"] == 64


def test_hash_and_keys_are_those_of_the_strings_alone():
    urls = pa.array(["ab", "abcdefgh", "abcdefghi", "http://x/" + "y" * 40, "ab"])
    hashes = hash_urls(urls)
    assert hashes[0] == hashes[4] and len(set(hashes[:4].tolist())) == 4
    assert hash_urls(urls.slice(1)).tolist() == hashes[1:].tolist()  # offsets, not buffer position
    assert hash_urls(pa.array(["x", "ab"]))[1] == hashes[0]  # wherever the string lies in its buffer
    rows = np.array([0, 5, 39, 40, 12345])
    assert make_keys(rows, 40).to_pylist() == [make_key(int(r), 40) for r in rows]
    assert make_keys(rows, 1).to_pylist() == [make_key(int(r), 1) for r in rows]


def test_no_rows_no_shards(tmp_path):
    counts, rows = plan_rows(tmp_path, [], 10)
    assert counts == {"rows": 0, "shards": 0, "duplicates": 0} and rows is None


def test_streams_a_csv_block_by_block_in_order(tmp_path):
    path = tmp_path / "list.csv"
    lines = [f"http://h/{i}.jpg,{i},{i % 7}" for i in range(3000)]
    path.write_text("url,caption,shard\n" + "\n".join(lines) + "\n")
    urls = open_input(str(path), block_bytes=4096)
    batches = list(urls.batches())
    assert len(batches) > 10 and all(b.schema == urls.schema for b in batches)
    table = pa.Table.from_batches(batches)
    assert table["caption"].to_pylist() == [str(i) for i in range(3000)]  # forced to text, not numbers
    assert table["shard"].to_pylist() == [i % 7 for i in range(3000)]


def test_streams_a_parquet_row_group_by_row_group_in_order(tmp_path):
    path = tmp_path / "list.parquet"
    urls = [f"http://h/{i}" for i in range(100)]
    pq.write_table(pa.table({"url": urls, "caption": ["c"] * 100}), path, row_group_size=7)
    batches = list(open_input(str(path), batch_rows=5).batches())
    assert [b.num_rows for b in batches] == [5, 2] * 14 + [2]  # 14 groups of 7, one of 2
    assert pa.Table.from_batches(batches)["url"].to_pylist() == urls


def test_a_csv_whose_types_change_late_is_one_line(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(
        "url,caption,score\n" + "".join(f"http://h/{i},c,{i}\n" for i in range(2000)) + "http://h/x,c,abc\n"
    )
    urls = open_input(str(path), block_bytes=4096)  # typed from the first block: score is a number
    with pytest.raises(InputError, match=r"^cannot read .*list\.csv as csv: .*'abc'[^\n]*$"):
        list(urls.batches())


def test_a_folder_of_lists_is_unified_up_front_and_read_file_after_file(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    pq.write_table(
        pa.table({"url": ["http://a/1"], "caption": ["one"], "score": pa.array([1], pa.int64())}), folder / "a.parquet"
    )
    (folder / "b.jsonl").write_text(json.dumps({"url": "http://a/2", "caption": "two", "score": 2.5}) + "\n")
    (folder / "c.txt").write_text("http://a/3\n\n  http://a/4  \n")
    urls = open_input(str(folder))
    assert urls.schema.field("score").type == pa.float64()
    table = pa.Table.from_batches(list(urls.batches()), urls.schema)
    assert table.to_pylist() == [
        {"url": "http://a/1", "caption": "one", "score": 1.0},
        {"url": "http://a/2", "caption": "two", "score": 2.5},
        {"url": "http://a/3", "caption": None, "score": None},
        {"url": "http://a/4", "caption": None, "score": None},
    ]


def _bad_inputs(tmp_path):
    lists = pa.table({"url": pa.array([["http://a/1"]]), "caption": ["x"]})
    pq.write_table(lists, tmp_path / "lists.parquet")
    pq.write_table(pa.table({"url": [1], "caption": ["x"]}), tmp_path / "ints.parquet")
    (tmp_path / "twice.csv").write_text("url,caption,url\nhttp://a/1,x,http://a/2\n")
    (tmp_path / "latin1.csv").write_bytes("url,caption\nhttp://a/1,caf\xe9\n".encode("latin-1"))
    (tmp_path / "latin1.txt").write_bytes("http://a/caf\xe9\n".encode("latin-1"))
    (tmp_path / "nested.jsonl").write_text(json.dumps({"url": {"href": "http://a/1"}, "caption": "x"}) + "\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8")
    (images / "a.txt").write_bytes("caf\xe9".encode("latin-1"))


@pytest.mark.parametrize(
    "name, message",
    [
        ("lists.parquet", r"column 'url' of input \S+lists\.parquet holds list<\w+: string>; expected one URL"),
        ("ints.parquet", r"column 'url' of input \S+ints\.parquet holds int64"),
        ("twice.csv", r"input \S+twice\.csv has 2 columns named 'url'"),
        ("latin1.csv", r"input \S+latin1\.csv is not UTF-8 text"),
        ("latin1.txt", r"input \S+latin1\.txt is not UTF-8 text"),
        ("nested.jsonl", r"column 'url' of input \S+nested\.jsonl holds struct<href: string>"),
        ("images", r"caption file \S+a\.txt is not UTF-8 text"),
    ],
)
def test_bad_input_is_one_line(tmp_path, name, message):
    _bad_inputs(tmp_path)
    with pytest.raises(InputError) as caught:
        urls = open_input(str(tmp_path / name))
        list(urls.batches())
    assert "\n" not in str(caught.value)
    assert caught.match(message)


def test_duplicated_columns_that_are_dropped_do_not_matter(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("url,caption,x,x\nhttp://a/1,one,1,2\n")
    with pytest.raises(InputError, match="has 2 columns named 'x'"):
        open_input(str(path))
    urls = open_input(str(path), extra_columns=[])
    assert pa.Table.from_batches(list(urls.batches())).to_pylist() == [{"url": "http://a/1", "caption": "one"}]


def test_folder_file_names_with_url_characters_read_their_own_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["a#b.jpg", "what?.jpg", "50%.jpg", "50%25.jpg", "sp ace é.jpg"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"image %d" % i)
    urls = open_input(str(folder))
    listed = pa.Table.from_batches(list(urls.batches()))["url"].to_pylist()
    assert len(listed) == len(names)
    fetcher = Fetcher(FetchSettings(local_root=urls.local_root), guard=None)
    for name, url in zip(sorted(names), listed):  # the folder is listed in name order
        fetched = asyncio.run(fetcher._read_file(URL(url)))  # as the crawler reads a file:// URL
        assert fetched.reason is None, (url, fetched.message)
        assert fetched.data == b"image %d" % names.index(name), url


def test_plan_files_on_another_filesystem(tmp_path):
    """A remote output gets its plan files through fsspec; the spill stays on local disk."""
    work = Location("memory://plan-test/_work")
    work.makedirs()
    table = pa.table({"url": ["http://a/1", "http://a/2", "http://a/1"], "caption": ["x", "y", "z"]})
    assert write_plan(table.to_batches(), 2, work, str(tmp_path / "spill"))["shards"] == 2
    assert work.listdir() == ["00000.parquet", "00001.parquet"] and not (tmp_path / "spill").exists()
    with work.fs.open(work.path("00001.parquet"), "rb") as f:
        assert pq.read_table(f).to_pylist() == [
            {"url": "http://a/1", "caption": "z", "key": "000010", "duplicate_of": "000000"}
        ]
    work.fs.rm(work.root, recursive=True)
