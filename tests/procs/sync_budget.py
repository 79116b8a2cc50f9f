"""Counts, per optimiser step of a real training run, the collectives dtrain issues besides
DDP's gradient all-reduce (which runs inside DDP's C++ reducer, not through these Python
functions) and the host read-backs (item, tolist, bool, float, int, numpy). Run under torchrun;
rank 0 writes {step: {...counts}} as JSON. test_distributed.py asserts the budget.

The loader runs in a worker process (data.num_workers=1): its CPU-side work is not the
training step's, and its counters are the worker's own copy."""

import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

from dtrain.config import load_config
from dtrain.train import train

counts: Counter = Counter()


def counting(name: str, original):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    return wrapper


for name in ("all_reduce", "all_gather", "all_to_all", "broadcast", "reduce_scatter"):
    setattr(dist, name, counting(name, getattr(dist, name)))
for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
    setattr(torch.Tensor, name, counting(f"read:{name}", getattr(torch.Tensor, name)))

if __name__ == "__main__":
    out, overrides = sys.argv[1], sys.argv[2:]
    per_step = {}

    def on_step(info) -> None:
        per_step[info.step] = {**counts, "log": info.metrics is not None}
        counts.clear()

    train(load_config(None, overrides), on_step=on_step)
    if os.environ.get("RANK", "0") == "0":  # the process group is closed by now
        with open(out, "w") as handle:
            json.dump(per_step, handle)
