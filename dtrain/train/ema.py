"""An exponential moving average of the network's weights, kept beside the trained ones and
evaluated each epoch: under label noise the raw weights of the last epochs swing with the wrong
labels they are fitting, and their average is steadier (timm's `ModelEmaV3`, with its warm-up so
that the first steps are not averaged with the random initialisation for long)."""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3

# decay = min(train.ema_decay, 1 - (1 + step)^-0.75): 0.97 at step 100, 0.993 at step 800
WARMUP_POWER = 0.75


class WeightAverage:
    """The EMA copy of `net` (same device and dtype); `update` after every optimiser step."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        # fp32 even for a bf16 model (DeepSpeed): a bf16 average could not hold the small steps
        self._ema = ModelEmaV3(
            net, decay=decay, use_warmup=True, warmup_power=WARMUP_POWER, dtype=torch.float32
        )

    @property
    def net(self) -> torch.nn.Module:
        return self._ema.module

    def update(self, net: torch.nn.Module, step: int) -> None:
        """Move towards `net`; no read-back (the decay is computed from the step count)."""
        self._ema.update(net, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(weights)
