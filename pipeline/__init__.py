"""pixelmill's data pipeline: crawl → annotate → filter → shard, as Ray stages."""
