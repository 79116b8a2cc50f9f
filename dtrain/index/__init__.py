"""`dtrain index`: a dataset folder for WebDataset shards that your own pipeline wrote, without
copying them. It stands between the two stages: it reads shards as the loader does
(`dtrain.dataset.shard_reader`) and writes the records `dtrain prepare` writes
(`dtrain.prepare.records`).

`scan` does the work; `cli` is its command line (kept apart: `scan` imports torch)."""
