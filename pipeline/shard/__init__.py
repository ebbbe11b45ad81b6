"""Shard: kept samples into shuffled, evenly sized training tars; held-out eval sets in clip_benchmark layout."""
