"""Region-text data: the built-in shapes world, webdataset shards, transforms and batching."""
