"""Runs one rank of the streaming loader in its own process (with its own worker processes) and
writes what it saw as JSON: used by test_loader.py to check exactly-once coverage."""

import json
import sys

from dtrain.dataset.loader import make_loader

if __name__ == "__main__":
    dataset, rank, world, train, out = sys.argv[1:6]
    shards = int(sys.argv[6]) if len(sys.argv) > 6 else None  # only the first N shards
    from dtrain.dataset.loader import split_urls

    loader = make_loader(
        split_urls(dataset, "train")[:shards],
        train=train == "train",
        batch_size=8,
        image_size=16,
        num_workers=2,
        rank=int(rank),
        world_size=int(world),
        seed=3,
    )
    seen = {}
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches, keys = 0, []
        for batch in loader:
            batches += 1
            assert len(batch["key"]) == 8
            keys += [k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v]
        seen[epoch] = {"batches": batches, "len": len(loader), "keys": keys}
    with open(out, "w") as handle:
        json.dump(seen, handle)
