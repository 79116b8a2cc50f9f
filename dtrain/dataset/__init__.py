"""A prepared dataset and its stream: the folder format (`format`, `records`), WebDataset shards
written (`shard_writer`) and read (`shard_reader`), and the streaming loader that feeds training
(`loader`, `loader_plan`, `transforms`, `images`)."""
