"""Near-duplicate confirmation and semantic dedup at scale: rows/s, recall, false drops and peak RSS per rule.

    python bench/dedup_scale.py [--rows 1000000] [--copies 0.01] [--json out.json]

Synthetic metadata in the filter's in-memory form (what pipeline/filter/run.read_metadata returns): keys,
random 192-bit difference hashes (48 hex digits), random unit `image_embedding` vectors (float32, dim 64) and
thumbnails (pipeline/thumbnails.py's layout) whose pictures are smooth random fields, an 8×8 grid of random
values upsampled bilinearly to 32×32 luma (4×4 to 16×16 chroma) plus a little pixel noise, so that distinct
rows do not correlate beyond chance (both views are the same picture: no background to trim). A share
`--copies` of the rows are planted as altered copies of another row drawn at random: the thumbnail lighter
or darker by 8-20 grey levels with noise, the hash with 1-6 bits flipped, the embedding with noise (cosine
about 0.99). Generation runs in chunks.

Each rule (the default `near_duplicate` of conf/filter/basic.yaml, SemanticDuplicate(eps=0.05)) runs in its
own subprocess over all rows, which generates the same rows (seeded) and reports: the rule's seconds and
rows/s; recall (planted pairs where the rule drops one row as a repeat of the other); false drops (dropped
rows that are not a planted copy's pair); the RSS of the generated data and the peak during the rule alone
(VmHWM, reset through /proc/self/clear_refs after generation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from pipeline.thumbnails import SIDE, THUMBNAIL_BYTES, VIEWS  # noqa: E402

CHUNK = 65_536
DIM = 64
HASH_BYTES = 24
RULES = ("near_duplicate", "semantic_duplicate")


def upsampling(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation at pixel centres."""
    p = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(p).astype(int)
    i1, f = np.minimum(i0 + 1, n_in - 1), p - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m


def smooth_fields(rng: np.random.Generator, count: int, side: int, grid: int, scale: float, noise: int) -> np.ndarray:
    """(count, side, side) uint8: 128 + scale × a bilinear upsampling of a grid × grid random field, + noise."""
    up = upsampling(side, grid)
    field = up @ rng.standard_normal((count, grid, grid), np.float32) @ up.T
    field = 128 + scale * field + rng.integers(-noise, noise + 1, (count, side, side), dtype=np.int8)
    return np.clip(field, 0, 255).astype(np.uint8)


def view_bytes(luma: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """(count, view bytes) in pipeline/thumbnails.py's layout, aspect ratio 1."""
    aspect = np.broadcast_to(np.frombuffer(np.float16(1.0).tobytes(), np.uint8), (len(luma), 2))
    return np.concatenate([luma.reshape(len(luma), -1), cb.reshape(len(cb), -1), cr.reshape(len(cr), -1), aspect], 1)


def thumbnails(rng: np.random.Generator, count: int, grid: int) -> np.ndarray:
    """(count, THUMBNAIL_BYTES) uint8: both views the same smooth random picture."""
    luma = smooth_fields(rng, count, SIDE, grid, 45, 4)
    cb, cr = (smooth_fields(rng, count, SIDE // 2, 4, 12, 1) for _ in range(2))
    view = view_bytes(luma, cb, cr)
    return np.tile(view, (1, len(VIEWS)))


def alter_thumbnail(rng: np.random.Generator, blob: bytes) -> bytes:
    """Lighter or darker by 8-20 grey levels, with a little noise, in every luma and chroma byte but the aspect."""
    raw = np.frombuffer(blob, np.uint8).astype(np.int16).reshape(len(VIEWS), -1)
    shift = rng.choice([-1, 1]) * rng.integers(8, 21)
    luma = slice(0, SIDE * SIDE)
    raw[:, luma] += shift
    raw[:, :-2] += rng.integers(-2, 3, raw[:, :-2].shape, dtype=np.int16)
    return np.clip(raw, 0, 255).astype(np.uint8).tobytes()


def generate(rows: int, copies: float, seed: int, grid: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The metadata and, per row, the row it is a planted copy of (-1: an original)."""
    meta = {
        "key": np.array([f"{i:09d}" for i in range(rows)], dtype=object),
        "error": np.full(rows, None, dtype=object),
        "dhash": np.empty(rows, dtype=object),
        "thumbnail": np.empty(rows, dtype=object),
        "image_embedding": np.empty((rows, DIM), np.float32),
    }
    for start in range(0, rows, CHUNK):
        rng = np.random.default_rng([seed, start])
        count = min(CHUNK, rows - start)
        blobs = thumbnails(rng, count, grid)
        meta["thumbnail"][start : start + count] = [b.tobytes() for b in blobs]
        hashes = rng.integers(0, 256, (count, HASH_BYTES), dtype=np.uint8)
        meta["dhash"][start : start + count] = [h.tobytes().hex() for h in hashes]
        vectors = rng.standard_normal((count, DIM), np.float32)
        meta["image_embedding"][start : start + count] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, rows])
    copy_of = np.full(rows, -1, np.int64)
    planted = rng.choice(rows, size=2 * int(rows * copies), replace=False)
    for copy, source in planted.reshape(2, -1).T.tolist():  # copies and sources are disjoint: no chains
        copy_of[copy] = source
        meta["thumbnail"][copy] = alter_thumbnail(rng, meta["thumbnail"][source])
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(meta["dhash"][source]), np.uint8))
        bits[rng.choice(len(bits), rng.integers(1, 7), replace=False)] ^= 1
        meta["dhash"][copy] = np.packbits(bits).tobytes().hex()
        vector = meta["image_embedding"][source] + rng.normal(0, 0.02, DIM).astype(np.float32)
        meta["image_embedding"][copy] = vector / np.linalg.norm(vector)
    return meta, copy_of


def make_rule(name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if name == "near_duplicate":
        return instantiate(OmegaConf.load(os.path.join(ROOT, "conf", "filter", "basic.yaml")).near_duplicate)
    from pipeline.filter.semantic import SemanticDuplicate

    return SemanticDuplicate(eps=0.05)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_candidates(rule, stages: dict) -> None:
    """Wraps NearDuplicate's candidate search on this instance: its seconds and pairs, the rest is confirmation."""
    search = rule.candidates

    def candidates(*args):
        started = time.perf_counter()
        pairs = search(*args)
        stages.update(candidate_seconds=time.perf_counter() - started, candidate_pairs=len(pairs))
        return pairs

    rule.candidates = candidates


def child(name: str, rows: int, copies: float, seed: int, grid: int) -> None:
    """The measured process: generate, run one rule over all rows, report (JSON on stdout)."""
    rule, stages = make_rule(name), {}
    if hasattr(rule, "candidates"):
        timed_candidates(rule, stages)
    started = time.perf_counter()
    meta, copy_of = generate(rows, copies, seed, grid)
    generate_seconds = time.perf_counter() - started
    data_mb, reset = _status_mb("VmRSS"), _reset_peak()
    started = time.perf_counter()
    found = rule.duplicates(meta, np.ones(rows, bool))
    seconds = time.perf_counter() - started
    peak_mb = _status_mb("VmHWM")
    dropped = np.flatnonzero(found.of >= 0)
    partner = copy_of.copy()
    partner[copy_of[copy_of >= 0]] = np.flatnonzero(copy_of >= 0)  # a source's partner is its copy
    caught = int((partner[dropped] == found.of[dropped]).sum())
    report = {
        "rule": name,
        "rows": rows,
        "planted": int((copy_of >= 0).sum()),
        "caught": caught,
        "false_drops": len(dropped) - caught,
        "seconds": seconds,
        "generate_seconds": generate_seconds,
        "data_rss_mb": data_mb,
        "peak_rss_mb": peak_mb,
        "peak_is_rule_only": reset,
        **stages,
    }
    print(json.dumps(report))


def print_table(args, results: list[dict]) -> None:
    planted = results[0]["planted"]
    print(
        f"\nduplicate rules on {args.rows:,} synthetic rows ({args.grid}×{args.grid} luma fields), {planted:,} planted"
        f" copies; {os.cpu_count()} CPUs"
    )
    print(
        f"{'rule':<20}{'seconds':>9}{'rows/s':>9}{'recall':>8}{'false drops':>13}{'data RSS MB':>13}"
        f"{'peak RSS MB':>13}{'rule adds MB':>14}"
    )
    for r in results:
        print(
            f"{r['rule']:<20}{r['seconds']:>9.1f}{r['rows'] / r['seconds']:>9.0f}{r['caught'] / r['planted']:>8.3f}"
            f"{r['false_drops']:>13}{r['data_rss_mb']:>13.0f}{r['peak_rss_mb']:>13.0f}"
            f"{r['peak_rss_mb'] - r['data_rss_mb']:>14.0f}"
        )
    for r in results:
        if "candidate_pairs" in r:
            confirm = r["seconds"] - r["candidate_seconds"]
            print(
                f"{r['rule']}: candidate search {r['candidate_seconds']:.1f} s, {r['candidate_pairs']:,} pairs"
                f" ({r['candidate_pairs'] / r['rows']:.2f} a row); confirmation and grouping {confirm:.1f} s"
                f" ({r['candidate_pairs'] / max(confirm, 1e-9):,.0f} pairs/s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--copies", type=float, default=0.01, help="share of rows planted as altered copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=16, help="random values per side of a thumbnail's luma field")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rows, args.copies, args.seed, args.grid)
    assert thumbnails(np.random.default_rng(0), 1, args.grid).shape[1] == THUMBNAIL_BYTES
    results = []
    for name in args.rules.split(","):
        if name not in RULES:
            sys.exit(f"--rules: {name!r}; expected some of {', '.join(RULES)}")
        print(f"{name} on {args.rows:,} rows…", flush=True)
        command = [sys.executable, __file__, "--child", name, "--rows", str(args.rows), "--copies", str(args.copies)]
        command += ["--seed", str(args.seed), "--grid", str(args.grid)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print_table(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "copies": args.copies, "cpus": os.cpu_count(), "results": results}, f)


if __name__ == "__main__":
    main()
