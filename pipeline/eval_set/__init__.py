"""Held-out evaluation sets in clip_benchmark's webdataset layout."""
