"""Checkpoints: `last.pt` after every epoch and on a stop, `best.pt` beside it when the selection
metric improves. Each save serialises once, to a temp file; `best.pt` becomes a hard link to it
before it is renamed to `last.pt` (timm's CheckpointSaver way), so a crash at any point leaves
both files whole, and `best.pt` is never behind a `last.pt` that recorded a new best. Read back
with `weights_only=True`: loading a checkpoint never runs code from it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dtrain.errors import RunFolderError
from dtrain.files import link_atomic, promote, write_atomic
from dtrain.train.engine import Engine
from dtrain.train.rng import set_rng_state

LAST, BEST = "last.pt", "best.pt"
SHARDS = "deepspeed"  # the run folder's DeepSpeed shard tags


@dataclass
class TrainState:
    """Where a run is; everything else a resume needs is in the engine and the RNGs."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of `epoch` already trained on
    step: int = 0  # optimiser steps
    best_val: float = -1.0
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    corrupt_samples: int = 0

    def state_dict(self) -> dict:
        values = asdict(self)
        values["history"] = json.dumps(self.history)  # plain strings load under weights_only
        return values

    def load_state_dict(self, values: dict) -> None:
        for name, value in values.items():
            setattr(self, name, json.loads(value) if name == "history" else value)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint read with weights_only=True (it never runs code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


class CheckpointSaver:
    """Collective saves of a run: every rank calls `save`; rank 0 writes the files, each rank
    its own DeepSpeed shards under `run_dir/deepspeed/<tag>`."""

    def __init__(self, run_dir: Path, engine: Engine) -> None:
        self.run_dir = run_dir
        self.engine = engine
        self.shards = run_dir / SHARDS

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def save(self, payload: Callable[[], dict], step: int, best: bool) -> Path:
        """`payload()` builds the checkpoint dict (collective under ZeRO-3)."""
        # a new shard tag each save, named in last.pt: the previous one stays whole until
        # last.pt points past it, so a crash mid-save never leaves a half-written only copy
        tag = f"step{step}"
        has_shards = self.engine.save_shards(str(self.shards), tag)
        content = {**payload(), "deepspeed_tag": tag if has_shards else None}
        if self.engine.is_main:
            pending = write_atomic(
                self.run_dir / f".{LAST}.pending", lambda f: torch.save(content, f)
            )
            if best:
                link_atomic(pending, self.run_dir / BEST)
            promote(pending, self.last)
            if has_shards:
                for old in self.shards.iterdir():
                    if old.is_dir() and old.name.startswith("step") and old.name != tag:
                        shutil.rmtree(old)
        self.engine.barrier()
        return self.last

    def restore(self, checkpoint: dict) -> None:
        """Weights and optimiser (or the DeepSpeed shards the checkpoint names), and RNGs."""
        self.engine.load(
            checkpoint["model"],
            checkpoint["optimizer"],
            str(self.shards),
            checkpoint.get("deepspeed_tag"),
        )
        states = checkpoint["rng"]
        rank = self.engine.process_index
        set_rng_state(states[rank] if rank < len(states) else states[0])
