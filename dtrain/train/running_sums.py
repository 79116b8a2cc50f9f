"""Running sums of a training span, kept on the device until a log step or an epoch end reads
them back: the metric sums and the count of skipped (non-finite) optimiser steps."""

from __future__ import annotations

import torch

from dtrain import distributed
from dtrain.train.checkpoint import TrainState


class MetricSums:
    """Per-rank sums of a span of micro-steps, kept on the device: valid samples, correct
    predictions, corrupt samples, and each loss term times the valid count."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.values[name] = self.values[name] + value if name in self.values else value

    def add_step(self, out: dict, batch: dict) -> None:
        """One micro-step's outputs and batch; no read-back."""
        valid = batch["valid"]
        count = valid.sum()
        self._add("valid", count)
        self._add("correct", ((out["logits"].argmax(-1) == batch["label"]) & valid).sum())
        self._add("corrupt", batch["corrupt"].sum())
        for name, value in {"loss": out["loss"], **out["terms"]}.items():
            self._add(name, value * count)

    def put(self, name: str, value: float) -> None:
        """A value of this rank's to sum with the others' (the epoch's stop flag)."""
        self.values[name] = torch.tensor(value, dtype=torch.float64, device=self.device)

    def names(self) -> list[str]:
        """The order of `vector()` (sorted: the same on every rank)."""
        return sorted(self.values)

    def vector(self) -> torch.Tensor:
        """The sums as one device tensor, for the header all-reduce."""
        return torch.stack([self.values[n] for n in self.names()])

    def reduce(self) -> dict[str, float]:
        """Collective: the sums over all ranks, read back."""
        return dict(
            zip(self.names(), distributed.sum_over_ranks(self.vector()).tolist(), strict=True)
        )

    def clear(self) -> None:
        """Start a new span (after a log step read it)."""
        self.values = {}

    def resume(self, totals: dict[str, float], main: bool) -> None:
        """Continue an epoch from a checkpoint's `totals` (the sums over all ranks, `saved()`):
        the main rank holds them, the others zeros under the same names (the all-reduce needs
        the same vector on every rank)."""
        self.values = {
            name: torch.tensor(value if main else 0.0, dtype=torch.float64, device=self.device)
            for name, value in totals.items()
        }

    def saved(self) -> dict[str, float]:
        """Collective: the sums over all ranks so far, for a mid-epoch checkpoint."""
        return {k: v for k, v in self.reduce().items() if k != STOP} if self.values else {}


STOP = "stop"  # the epoch's stop flag, agreed through the epoch sums' all-reduce


def epoch_metrics(totals: dict[str, float], seconds: float, before: float) -> dict[str, float]:
    """An epoch's train metrics from its sums over all ranks (`stop` taken out): the means per
    valid sample, and the throughput of the `seconds` this process trained, `before` samples
    having been trained on before a resume."""
    totals = dict(totals)
    seen = max(1.0, totals.pop("valid", 0.0))
    correct = totals.pop("correct", 0.0)
    totals.pop("corrupt", None)
    return {
        **{f"train_{k}": v / seen for k, v in totals.items()},
        "train_accuracy": correct / seen,
        "images_per_s": (seen - before) / seconds,
    }


class NonFiniteCounter:
    """Skipped optimiser steps, counted on the device and read on log steps and epoch ends. The
    engines decide a skip identically on every rank, so no agreement is needed."""

    def __init__(self, device: torch.device, state: TrainState) -> None:
        self.state = state
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row = torch.full((), state.nonfinite_in_a_row, dtype=torch.int64, device=device)

    def update(self, taken: torch.Tensor) -> None:
        missed = (~taken).to(torch.int64)
        self.skipped += missed
        self.in_a_row = (self.in_a_row + 1) * missed

    def read(self) -> None:
        skipped, in_a_row = torch.stack([self.skipped, self.in_a_row]).tolist()
        self.state.skipped_steps += skipped
        self.state.nonfinite_in_a_row = in_a_row
        self.skipped.zero_()
