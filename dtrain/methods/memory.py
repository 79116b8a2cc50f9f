"""What a method keeps per training sample between epochs (ELR's targets, DivideMix's division):
its rule, which the trainer applies (dtrain/train/sample_memory.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryRule:
    """A method's per-sample memory (ELR's targets, DivideMix's division), kept by the trainer:
    a row per sample, `initial` before its first epoch. A step reads the sample's row as
    batch["memory"] and hands back StepOutput.memory; at each epoch's end the rows of the
    samples seen become end_epoch(row, what the steps handed back)."""

    initial: tuple[float, ...]
    end_epoch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def width(self) -> int:
        return len(self.initial)
