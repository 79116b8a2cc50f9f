"""Checkpoints: `last.pt` after every epoch, every `train.checkpoint_every_steps` /
`_minutes` mid-epoch and on a stop, `best.pt` beside it when the selection metric improves. Each
save serialises once, to a temp file; `best.pt` becomes a hard link to it before it is renamed to
`last.pt` (timm's CheckpointSaver way), so a crash at any point leaves both files whole, and
`best.pt` is never behind a `last.pt` that recorded a new best. A full disk fails the save with
both files as they were. Read back with `weights_only=True`: loading a checkpoint never runs code
from it."""

from __future__ import annotations

import errno
import json
import shutil
import time
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
    best_val: float = -1.0  # the selection rule's best score so far (selection.START)
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    corrupt_samples: int = 0
    # why each skipped sample was skipped (shard and member), the first SKIPS_KEPT of them
    skipped: list[str] = field(default_factory=list)
    # a mid-epoch checkpoint's sums of `epoch` so far, over all ranks (running_sums.MetricSums)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    # the tracked run of each tracker but TensorBoard (dtrain.train.trackers), by name
    tracker_runs: dict[str, str] = field(default_factory=dict)

    def note_skipped(self, reasons: list[str]) -> None:
        self.skipped.extend(reasons[: max(0, SKIPS_KEPT - len(self.skipped))])

    def state_dict(self) -> dict:
        values = asdict(self)
        for name in JSON_FIELDS:  # plain strings load under weights_only
            values[name] = json.dumps(values[name])
        return values

    def load_state_dict(self, values: dict) -> None:
        for name, value in values.items():
            setattr(self, name, json.loads(value) if name in JSON_FIELDS else value)


JSON_FIELDS = ("history", "skipped")
SKIPS_KEPT = 1000


class Cadence:
    """When a mid-epoch checkpoint is due: `every_steps` optimiser steps or `every_minutes`
    since the last save (0: never). Time is read on the main rank only and agreed with the
    others through the log step's all-reduce, so that every rank saves at the same step."""

    def __init__(self, every_steps: int, every_minutes: float, step: int) -> None:
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60
        self.saved(step)

    def saved(self, step: int) -> None:
        self.step, self.time = step, time.monotonic()

    def due_by_time(self) -> bool:
        return bool(self.every_seconds) and time.monotonic() - self.time >= self.every_seconds

    def due_by_steps(self, step: int) -> bool:
        return bool(self.every_steps) and step - self.step >= self.every_steps


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint read with weights_only=True (it never runs code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def selected_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights the run's selection rule picked (`train.select`): the trained ones, or their
    moving average, which a checkpoint keeps beside them (`ema`)."""
    if checkpoint.get("selected_weights") == "ema":
        return checkpoint["ema"]
    return checkpoint["model"]


def _nbytes(value: object) -> int:
    """The bytes of the tensors in a checkpoint: about what its file takes."""
    if torch.is_tensor(value):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _out_of_space(err: Exception, folder: Path, needed: int) -> bool:
    """Whether a failed write failed for want of room (the half-written file is gone by now)."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        shutil.disk_usage(folder).free < needed
    )


def _differences(saved: dict, now: dict) -> str:
    """`section.key=now (the run has saved)` for each key that differs."""
    return ", ".join(
        f"{section}.{key}={value!r} (the run has {saved[section].get(key)!r})"
        for section, values in now.items()
        for key, value in values.items()
        if saved[section].get(key) != value
    )


class CheckpointSaver:
    """Collective saves of a run: every rank calls `save`; rank 0 writes the files, each rank
    its own DeepSpeed shards under `run_dir/deepspeed/<tag>`."""

    def __init__(self, run_dir: Path, engine: Engine) -> None:
        self.run_dir = run_dir
        self.engine = engine
        self.shards = run_dir / SHARDS
        self.listeners: list[Callable[[int], None]] = []  # told each save's step (rank 0)

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    def resume_point(self, resume: bool, identity: dict) -> dict | None:
        """The checkpoint a run continues from, or None to start it from the beginning; refuses
        to resume one written with a different config. Whether the folder may be started or
        resumed at all was decided before (`dtrain.train.rounds.fit_rounds`, for the whole run
        and its rounds). A run folder with its config but no checkpoint yet (killed before its
        first save) starts over."""
        from dtrain.config import config_from_dict, load_config

        last, saved = self.last, self.run_dir / "config.yaml"
        if self.engine.is_main:  # what a save killed half-way left behind: never loaded
            for leftover in self.run_dir.glob(f"*.{LAST}.pending*"):
                leftover.unlink()
            for leftover in self.run_dir.glob(f".{BEST}.*.link"):
                leftover.unlink()
        if not resume:
            return None
        if last.exists():
            checkpoint = load_checkpoint(last)
            written_with = config_from_dict(checkpoint["config"])
        else:
            checkpoint, written_with = None, load_config(saved)
        if written_with.identity() != identity:
            raise RunFolderError(
                f"{last if checkpoint else saved} was written with a different config "
                f"({_differences(written_with.identity(), identity)}); resume with the saved "
                "config.yaml or start a new train.run_dir"
            )
        if checkpoint is None and self.engine.is_main:
            print(f"{self.run_dir} has no checkpoint yet: starting it from the beginning")
        return checkpoint

    def save(self, payload: Callable[[], dict], step: int, best: bool) -> Path:
        """`payload()` builds the checkpoint dict (collective under ZeRO-3)."""
        # a new shard tag each save, named in last.pt: the previous one stays whole until
        # last.pt points past it, so a crash mid-save never leaves a half-written only copy
        tag = f"step{step}"
        has_shards = self.engine.save_shards(str(self.shards), tag)
        content = {**payload(), "deepspeed_tag": tag if has_shards else None}
        if self.engine.is_main:
            try:
                pending = write_atomic(
                    self.run_dir / f".{LAST}.pending", lambda f: torch.save(content, f)
                )
            except (OSError, RuntimeError) as err:  # torch.save reports a short write as either
                if not _out_of_space(err, self.run_dir, _nbytes(content)):
                    raise
                raise RunFolderError(
                    f"no space left on the device of {self.run_dir} to write a checkpoint "
                    f"({shutil.disk_usage(self.run_dir).free / 2**20:.0f} MiB free); "
                    f"{LAST} and {BEST} there are intact and hold the last save before this "
                    "one: free space, then --resume"
                ) from err
            if best:
                link_atomic(pending, self.run_dir / BEST)
            promote(pending, self.last)
            for listener in self.listeners:
                listener(step)
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
