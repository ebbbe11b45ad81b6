"""Scoring pipeline outputs against the world's ground truth: crawl statuses and deduplication."""

from __future__ import annotations

import glob
import os

import pyarrow.parquet as pq


def raw_rows(raw_dir: str) -> list[dict]:
    """A crawl's rows in input order (keys follow input positions), so row i is ground-truth row i."""
    return [
        r
        for path in sorted(glob.glob(os.path.join(raw_dir, "0*.parquet")))
        for r in pq.read_table(path, columns=["key", "url", "status", "reason"]).to_pylist()
    ]


def crawl_agreement(truth_path: str, raw_dir: str) -> tuple[int, int]:
    """(rows that ended with the status and reason the ground truth expects, rows)."""
    truth = pq.read_table(truth_path).to_pylist()
    rows = raw_rows(raw_dir)
    agree = sum((r["status"], r["reason"]) == (t["expected_status"], t["expected_reason"]) for t, r in zip(truth, rows))
    return agree, len(truth)


def dedup_scores(truth_path: str, raw_dir: str, selection_dir: str) -> dict:
    """Precision and recall of the near-duplicate rule: positives are the world's `near_duplicate` rows that
    reached the rule (no earlier rule dropped them); predictions are rows it dropped. Also how many of the
    world's exact copies (`duplicate_image`) the exact rule removed."""
    truth = pq.read_table(truth_path).to_pylist()
    fault_of_key = {r["key"]: t["fault"] for t, r in zip(truth, raw_rows(raw_dir))}
    selection = pq.read_table(os.path.join(selection_dir, "selection.parquet")).to_pylist()
    reached = [s for s in selection if s["reason"] in (None, "near_duplicate")]
    predicted = [s for s in reached if s["reason"] == "near_duplicate"]
    actual = [s for s in reached if fault_of_key[s["key"]] == "near_duplicate"]
    hits = sum(fault_of_key[s["key"]] == "near_duplicate" for s in predicted)
    copies = [s for s in selection if fault_of_key[s["key"]] == "duplicate_image"]
    return {
        "near_duplicate_precision": hits / len(predicted) if predicted else 1.0,
        "near_duplicate_recall": hits / len(actual) if actual else 1.0,
        "near_duplicates": len(actual),
        "exact_copies": len(copies),
        "exact_copies_removed": sum(s["reason"] == "exact_duplicate" for s in copies),
    }


def mismatch_scores(truth_path: str, raw_dir: str, selection_dir: str, rule: str = "clip_score") -> dict:
    """How a filter rule treated the world's mismatched captions, among the rows that reached it (no earlier
    rule dropped them): mismatched rows it removed, clean rows it kept."""
    truth = pq.read_table(truth_path).to_pylist()
    fault_of_key = {r["key"]: t["fault"] for t, r in zip(truth, raw_rows(raw_dir))}
    selection = pq.read_table(os.path.join(selection_dir, "selection.parquet")).to_pylist()
    reached = [s for s in selection if s["reason"] in (None, rule)]
    mismatched = [s for s in reached if fault_of_key[s["key"]] == "caption_mismatch"]
    clean = [s for s in reached if fault_of_key[s["key"]] != "caption_mismatch"]
    return {
        "mismatched": len(mismatched),
        "mismatched_removed": sum(s["reason"] == rule for s in mismatched),
        "clean": len(clean),
        "clean_kept": sum(s["reason"] is None for s in clean),
    }
