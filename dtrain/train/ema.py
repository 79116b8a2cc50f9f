"""An exponential moving average of the network's weights, kept beside the trained ones and
evaluated each epoch: under label noise the raw weights of the last epochs swing with the wrong
labels they are fitting, and their average is steadier.

Its horizon is given in epochs (`train.ema_epochs`), so it means the same in a 12-epoch study run
and a 40-epoch job: the decay is 1 - 1/H for a horizon of H optimiser steps. Until H steps have
passed the average is the plain mean of every step so far (timm's `ModelEmaV3` warm-up at power
1: decay t/(t+1)), so the random initialisation is not carried for long. A fixed decay with
timm's default power-0.75 warm-up never reached 0.998 in a run of dtrain's length (step 3,970),
which made every decay above 0.9955 the same run."""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3


def horizon_steps(ema_epochs: float, steps_per_epoch: int) -> float:
    """The average's horizon in optimiser steps (at least 1)."""
    return max(1.0, ema_epochs * steps_per_epoch)


class WeightAverage:
    """The EMA copy of `net` (same device, fp32) over about `horizon` optimiser steps; `update`
    after every optimiser step."""

    def __init__(self, net: torch.nn.Module, horizon: float) -> None:
        # fp32 even for a bf16 model (DeepSpeed): a bf16 average could not hold the small steps
        self._ema = ModelEmaV3(
            net, decay=1.0 - 1.0 / horizon, use_warmup=True, warmup_power=1.0, dtype=torch.float32
        )

    @property
    def net(self) -> torch.nn.Module:
        return self._ema.module

    def decay_at(self, step: int) -> float:
        """The decay the update after optimiser step `step` uses (what the report prints)."""
        return self._ema.get_decay(step)

    def update(self, net: torch.nn.Module, step: int) -> None:
        """Move towards `net`; no read-back (the decay is computed from the step count)."""
        self._ema.update(net, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(weights)
