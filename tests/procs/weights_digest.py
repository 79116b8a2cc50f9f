"""Train the tiny run of the method (`iam`, the default when the digests were recorded; 2
epochs, stripes with 20% noise) and print the sha256 of its last weights and of their average:
what `test_weights_identity` compares with the digests recorded before the package moves. Run
with OMP_NUM_THREADS=1 (the digests are of a one-thread run)."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
from conftest import small_overrides, stripes_dataset  # noqa: E402

from dtrain.config import load_config  # noqa: E402
from dtrain.train import train  # noqa: E402


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous().reshape(-1)
        for part in (name, str(t.dtype), str(tuple(state[name].shape))):
            h.update(part.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


with tempfile.TemporaryDirectory() as tmp:
    data = stripes_dataset(Path(tmp), 40, shard_size=16)
    run = Path(tmp) / "run"
    train(load_config(None, small_overrides(data, run, 16, "method.name=iam")))
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    print("DIGEST model", digest(checkpoint["model"]))
    print("DIGEST ema", digest(checkpoint["ema"]))
