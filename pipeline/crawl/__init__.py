"""The crawl stage: URL list → raw shards in img2dataset's webdataset layout."""
