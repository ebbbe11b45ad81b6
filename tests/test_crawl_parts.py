"""The crawl's parts on their own: inputs and keys, opt-out parsing, image verification and resizing."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.crawl.fetch import opted_out
from pipeline.crawl.image import ImageProcessor, ImageSettings
from pipeline.crawl.inputs import InputError, make_key, open_input
from pipeline.crawl.planning import write_plan
from pipeline.storage import Location
from pipeline.world.world import declare_size

# -- inputs and keys ---------------------------------------------------------------------------------


def read_input(path: str, **options) -> pa.Table:
    """The whole opened input as one table (small inputs only)."""
    urls = open_input(path, **options)
    return pa.Table.from_batches(list(urls.batches()), urls.schema)


def test_keys_follow_img2dataset():
    assert make_key(0, 10000) == "000000000"
    assert make_key(10001, 10000) == "000010001"  # shard 1, index 1
    assert make_key(45, 40) == "0000105"  # shard 1, index 5; 40 per shard → 2 index digits
    assert make_key(3, 1) == "00003"


def test_plan_marks_repeats_and_keeps_every_row(tmp_path):
    table = pa.table({"url": ["a", "b", "a", None, "c", "b", "a"], "caption": list("1234567")})
    (tmp_path / "work").mkdir()
    counts = write_plan(table.to_batches(max_chunksize=2), 3, Location(str(tmp_path / "work")), str(tmp_path / "spill"))
    assert counts == {"rows": 7, "shards": 3, "duplicates": 3}
    shards = [pq.read_table(tmp_path / "work" / f"{i:05d}.parquet") for i in range(3)]
    assert [s.num_rows for s in shards] == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # the spill is gone
    rows = pa.concat_tables(shards).to_pylist()
    assert [r["duplicate_of"] for r in rows] == [None, None, "000000", None, None, "000001", "000000"]
    assert [r["key"] for r in rows] == ["000000", "000001", "000002", "000010", "000011", "000012", "000020"]
    assert [r["caption"] for r in rows] == list("1234567")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_every_input_format_with_extra_columns(tmp_path, fmt):
    rows = [{"url": f"http://h/{i}.jpg", "caption": f"c{i}", "license": "cc0", "score": i / 2} for i in range(4)]
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join([sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]) + "\n")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text("\n".join(r["url"] for r in rows) + "\n")
    urls = open_input(str(path))
    table = read_input(str(path))
    assert table["url"].to_pylist() == [r["url"] for r in rows]
    assert urls.local_root is None and len(urls.fingerprint) == 16
    if fmt == "txt":
        assert table.column_names == ["url", "caption"] and table["caption"].null_count == 4
    else:
        assert table.column_names == ["url", "caption", "license", "score"]
        assert table["score"].to_pylist() == [0.0, 0.5, 1.0, 1.5]
        only = read_input(str(path), extra_columns=["license"])
        assert only.column_names == ["url", "caption", "license"]


def test_custom_columns_and_an_image_folder(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("link,alt\nhttp://h/1.jpg,one\n")
    table = read_input(str(path), url_col="link", caption_col="alt")
    assert table.to_pylist() == [{"url": "http://h/1.jpg", "caption": "one"}]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    Image.new("RGB", (8, 8)).save(folder / "sub" / "b.png")
    (folder / "a.txt").write_text("a caption\n")
    assert open_input(str(folder)).local_root == str(folder)
    assert read_input(str(folder)).to_pylist() == [
        {"url": f"file://{folder}/a.jpg", "caption": "a caption"},
        {"url": f"file://{folder}/sub/b.png", "caption": None},
    ]


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_input(str(tmp_path / "nope.parquet"))
    path = tmp_path / "list.csv"
    path.write_text("link,alt\nhttp://h/1.jpg,one\n")
    with pytest.raises(InputError, match=r"no column 'url' \(columns: link, alt\)"):
        open_input(str(path))
    odd = tmp_path / "list.xyz"
    odd.write_text("http://h/1.jpg\n")
    with pytest.raises(InputError, match="cannot tell the format of .*list.xyz"):
        open_input(str(odd))
    clash = tmp_path / "clash.csv"
    clash.write_text("url,caption,status\nhttp://h/1.jpg,one,ok\n")
    with pytest.raises(InputError, match=r"\['status'\] clash"):
        open_input(str(clash))


# -- opt-outs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([], None),
        (["noai"], "noai"),
        (["noindex, nofollow"], "noindex"),
        (["max-snippet: 20, noimageai"], "noimageai"),
        (["pixelmill: noai"], "noai"),
        (["PixelMill: NoImageAI"], "noimageai"),
        (["otherbot: noai, noimageai"], None),
        (["otherbot: noai", "nofollow"], None),
        (["otherbot: noai", "noimageindex"], "noimageindex"),
        (["all"], None),
    ],
)
def test_x_robots_tag(headers, expected):
    assert opted_out(headers, "pixelmill", ("noai", "noimageai", "noindex", "noimageindex")) == expected


# -- images -----------------------------------------------------------------------------------------


def _jpeg(w, h, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode, size, expected",
    [
        ("border", (400, 200), (64, 64)),
        ("keep_ratio", (400, 200), (128, 64)),
        ("keep_ratio_largest", (400, 200), (64, 32)),
        ("center_crop", (400, 200), (64, 64)),
        ("no", (400, 200), (400, 200)),
        ("border", (32, 16), (64, 64)),  # upscaled
    ],
)
def test_resize_modes(mode, size, expected):
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode=mode))(_jpeg(*size))
    assert out.reason is None
    assert (out.width, out.height) == expected
    assert Image.open(io.BytesIO(out.data)).size == expected
    assert (out.original_width, out.original_height) == size


def test_border_pads_white_and_keeps_the_image_centred():
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="border"))(_jpeg(400, 200))
    pixels = Image.open(io.BytesIO(out.data)).convert("RGB")
    assert all(c > 240 for c in pixels.getpixel((32, 2)))  # padding
    r, g, b = pixels.getpixel((32, 32))
    assert r > 150 and g < 80  # the red picture


def test_resize_only_if_bigger_and_untouched_bytes_are_kept():
    small = _jpeg(32, 32)
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True))(small)
    assert out.data == small and (out.width, out.height) == (32, 32)
    png = ImageProcessor(ImageSettings(image_size=64, encode_format="png"))(_jpeg(100, 100))
    assert png.data.startswith(b"\x89PNG")


def test_transparency_is_flattened_on_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buffer, "PNG")
    out = ImageProcessor(ImageSettings(image_size=10, resize_mode="no", encode_format="jpg"))(buffer.getvalue())
    assert min(Image.open(io.BytesIO(out.data)).convert("RGB").getpixel((5, 5))) > 245


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    out = ImageProcessor(ImageSettings(image_size=64, resize_mode="no"))(buffer.getvalue())
    assert (out.width, out.height) == (20, 40)
    assert json.loads(out.exif) == {"Image Orientation": "6"}  # img2dataset's exif field, from the original


def test_refusals_before_decoding():
    processor = ImageProcessor(
        ImageSettings(image_size=64, max_pixels=100 * 100, min_image_size=16, max_aspect_ratio=3)
    )
    assert processor(_jpeg(200, 200)).reason == "too_many_pixels"
    bomb = declare_size(_jpeg(16, 16), 40000, 40000)
    assert processor(bomb).reason == "too_many_pixels"
    huge_cap = ImageProcessor(ImageSettings(max_pixels=10**12))
    assert huge_cap(bomb).reason == "too_many_pixels"  # PIL's own bomb check is a second line
    assert processor(_jpeg(8, 8)).reason == "image_too_small"
    assert processor(_jpeg(90, 20)).reason == "aspect_ratio"
    assert processor(b"<html>not an image</html>").reason == "not_an_image"
    assert processor(_jpeg(64, 64)[:300]).reason == "corrupt_image"
    with pytest.raises(ValueError, match="resize_mode='squash'"):
        ImageSettings(resize_mode="squash")
