"""Annotate: one row of signals per sample of raw shards (hashes, sizes, caption stats, CLIP score)."""
