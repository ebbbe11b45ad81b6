"""The world's URL list: rows, their faults, the bytes each URL serves, and the ground truth of every row."""

from __future__ import annotations

import io
import os
import random
from functools import cache

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.world.render import encode_jpeg, render
from pipeline.world.scene import Vocabulary, caption, sample_scene

# fault -> (expected status, expected reason) for a crawl with the default config (retries ≥ 1).
EXPECTED = {
    "none": ("success", None),
    "http_404": ("failed_to_download", "http_404"),
    "http_500": ("failed_to_download", "http_500"),
    "flaky": ("success", None),
    "slow": ("failed_to_download", "timeout"),
    "reset": ("failed_to_download", "connection_error"),
    "redirect": ("success", None),
    "redirect_loop": ("failed_to_download", "redirect_loop"),
    "redirect_internal": ("failed_to_download", "blocked_address"),
    "fake_image": ("failed_to_resize", "not_an_image"),
    "truncated": ("failed_to_resize", "corrupt_image"),
    "corrupt": ("failed_to_resize", "corrupt_image"),
    "bomb": ("failed_to_resize", "too_many_pixels"),
    "huge": ("failed_to_download", "too_large"),
    "duplicate_url": ("duplicate", "duplicate_url"),
    "duplicate_image": ("success", None),
    "near_duplicate": ("success", None),
    "opt_out": ("failed_to_download", "opted_out"),
    "opt_out_other_bot": ("success", None),
    "caption_mismatch": ("success", None),
}
# Faults that may pass on a later try: a crawl retries them, and `retry_failed=true` fetches them again.
TRANSIENT = {"flaky", "slow", "reset"}
# Faults whose row points at another (clean, earlier) row's image or URL.
NEEDS_SOURCE = {"duplicate_url", "duplicate_image", "near_duplicate"}
OPT_OUT_HEADERS = ["noai", "noimageai", "pixelmill: noai"]
FAKE_BODY = b"<!doctype html><html><body><h1>Not found</h1><p>This is a web page, not an image.</p></body></html>"
BOMB_SIDE = 40000


class World:
    """Deterministic for a config: the same rows, URLs (up to the base URL) and bytes on every machine."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.vocab = Vocabulary.from_config(cfg)
        self.size = int(cfg["image_size"])
        self.quality = int(cfg["jpeg_quality"])
        self.n = int(cfg["n"])
        self.faults = self._assign_faults()
        self.rows: list[dict] = []
        for i in range(self.n):  # in order: a duplicate URL reads the row it copies
            self.rows.append(self._row(i))

    # -- the list ------------------------------------------------------------------------------------
    def _assign_faults(self) -> list[tuple[str, int | None]]:
        for fault in self.cfg["faults"]:
            if fault not in EXPECTED:
                raise ValueError(f"unknown world fault {fault!r}; expected one of {sorted(set(EXPECTED) - {'none'})}")
        rng = random.Random(f"{self.cfg['seed']}:faults")
        counts = {f: max(1, round(float(x) * self.n)) for f, x in self.cfg["faults"].items() if float(x) > 0}
        if sum(counts.values()) > self.n // 2:
            raise ValueError(
                f"world.faults ask for {sum(counts.values())} faulty rows of n={self.n}; keep them under half"
            )
        # Rows that point back at a source need a clean row before them, so they come from the later half.
        late = list(range(self.n // 2, self.n))
        rng.shuffle(late)
        pool = [i for i in range(self.n) if i not in set(late)]
        rng.shuffle(pool)
        assigned: dict[int, str] = {}
        for fault, k in counts.items():
            source = late if fault in NEEDS_SOURCE else (pool or late)
            for _ in range(k):
                if not source:
                    source = late if source is pool else pool
                assigned[source.pop()] = fault
        clean = sorted(i for i in range(self.n) if i not in assigned)
        faults: list[tuple[str, int | None]] = []
        for i in range(self.n):
            fault = assigned.get(i, "none")
            src = None
            if fault in NEEDS_SOURCE:
                src = rng.choice([c for c in clean if c < i])
            faults.append((fault, src))
        return faults

    def scene(self, index: int) -> dict:
        return sample_scene(self.vocab, int(self.cfg["seed"]), index, float(self.cfg["relation_fraction"]))

    def _row(self, i: int) -> dict:
        fault, src = self.faults[i]
        shown = src if src is not None else i  # the world image this row's bytes show
        scene = self.scene(shown)
        text = caption(scene, phrasing=i)
        if fault == "caption_mismatch":
            other = self._mismatched_scene(i, scene)
            text = caption(other, phrasing=i)
        path = {
            "none": "img",
            "redirect_loop": "loop_a",
            "duplicate_url": None,
        }.get(fault, fault)
        url_path = self.rows[src]["path"] if fault == "duplicate_url" else f"/{path}/{i}.jpg"
        status, reason = EXPECTED[fault]
        return {
            "row": i,
            "path": url_path,
            "caption": text,
            "fault": fault,
            "source_row": src,
            "transient": fault in TRANSIENT,
            "expected_status": status,
            "expected_reason": reason,
            "caption_matches": fault != "caption_mismatch",
            **{k: v for k, v in scene.items() if k not in ("layout_seed", "index")},
            "image_index": shown,
        }

    def _mismatched_scene(self, i: int, scene: dict) -> dict:
        """A scene that differs from `scene` in both shape and colour, so the caption is plainly wrong."""
        for k in range(1, 10_000):
            other = self.scene(self.n + i * 7919 + k)
            if other["shape"] != scene["shape"] and other["colour"] != scene["colour"]:
                return other
        raise RuntimeError("no mismatched scene found")

    # -- the bytes -----------------------------------------------------------------------------------
    @cache  # noqa: B019  (one World per server, alive as long as it serves: the cache is the point)
    def image_bytes(self, index: int) -> bytes:
        return encode_jpeg(render(self.scene(index), self.vocab, self.size), self.quality)

    def body(self, row: int) -> bytes:
        """The bytes served for `row` (for redirects: the bytes at the end of the chain)."""
        fault, src = self.faults[row]
        if fault == "duplicate_image":
            return self.image_bytes(src)
        if fault == "near_duplicate":
            return near_duplicate(self.image_bytes(src), variant=row, quality=self.quality)
        if fault == "fake_image":
            return FAKE_BODY
        data = self.image_bytes(row)
        if fault == "truncated":
            return data[: len(data) // 2]
        if fault == "corrupt":
            return break_huffman_table(data)
        if fault == "bomb":
            return declare_size(data, BOMB_SIDE, BOMB_SIDE)
        return data

    def opt_out_header(self, row: int) -> str | None:
        fault, _ = self.faults[row]
        if fault == "opt_out":
            return OPT_OUT_HEADERS[row % len(OPT_OUT_HEADERS)]
        if fault == "opt_out_other_bot":
            return "otherbot: noai, noimageai"
        return None

    def write(self, folder, base_url: str) -> tuple[str, str]:
        """Write `urls.parquet` (url, caption) and `ground_truth.parquet` (every row's fault and attributes)."""
        os.makedirs(folder, exist_ok=True)
        base = base_url.rstrip("/")
        truth = [{"url": base + r["path"], **{k: v for k, v in r.items() if k != "path"}} for r in self.rows]
        urls_path, truth_path = os.path.join(folder, "urls.parquet"), os.path.join(folder, "ground_truth.parquet")
        pq.write_table(pa.Table.from_pylist([{"url": t["url"], "caption": t["caption"]} for t in truth]), urls_path)
        pq.write_table(pa.Table.from_pylist(truth), truth_path)
        return urls_path, truth_path


def near_duplicate(data: bytes, variant: int, quality: int) -> bytes:
    """Re-encoded, resized or slightly cropped: the same picture to a person, different bytes."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    kind = variant % 3
    if kind == 0:
        return encode_jpeg(image, max(40, quality - 35))
    if kind == 1:
        return encode_jpeg(image.resize((int(w * 0.8), int(h * 0.8)), Image.BICUBIC), quality)
    m = max(1, int(0.02 * w))
    return encode_jpeg(image.crop((m, m, w - m, h - m)), quality)


def break_huffman_table(data: bytes) -> bytes:
    """Full length, headers in place, but a Huffman table that claims more codes than exist: opens, then
    fails to decode (libjpeg: "Bogus Huffman table definition")."""
    at = data.find(b"\xff\xc4")
    out = bytearray(data)
    out[at + 5 : at + 21] = b"\xff" * 16  # the 16 code-length counts of the first table
    return bytes(out)


def declare_size(data: bytes, width: int, height: int) -> bytes:
    """A decompression bomb in a few kilobytes: rewrite the JPEG frame header to claim width × height."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            out = bytearray(data)
            out[at + 5 : at + 7] = height.to_bytes(2, "big")
            out[at + 7 : at + 9] = width.to_bytes(2, "big")
            return bytes(out)
    raise ValueError("no JPEG frame header found")
