"""What a skipped optimiser step must not leave behind, besides the weights the engine keeps.

The forward passes of a window run before anyone knows that its step will be skipped, and they
have already moved the batch-norm running statistics (to NaN, for a non-finite activation); the
weight average is updated after every step. `StepGuard` puts both back as they were before the
window where the engine reports the step skipped, on the device: no value is read back."""

from __future__ import annotations

import torch

from dtrain.train.ema import WeightAverage


class StepGuard:
    """`open()` before a window's first forward pass, `settle(taken, step)` after its optimiser
    step, with the engine's `step` result: it also updates the weight average."""

    def __init__(self, net: torch.nn.Module, average: WeightAverage | None) -> None:
        self.net, self.average = net, average
        self._buffers: list[torch.Tensor] = []

    def open(self) -> None:
        self._buffers = [b.detach().clone() for b in self.net.buffers()]

    def settle(self, taken: torch.Tensor, step: int) -> None:
        """The net's buffers as before the window where the step was skipped (before the
        average reads them), then the average's update, undone there."""
        _keep_where(taken, list(self.net.buffers()), self._buffers)
        self._buffers = []
        if self.average is None:
            return
        average = list(self.average.net.state_dict().values())
        before = [t.clone() for t in average]
        self.average.update(self.net, step)
        _keep_where(taken, average, before)


def _keep_where(taken: torch.Tensor, now: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, old in zip(now, before, strict=True):
            tensor.copy_(torch.where(taken, tensor, old))
