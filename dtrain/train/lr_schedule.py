"""dtrain's learning-rate schedule (a DeepSpeed `scheduler` section replaces it)."""

from __future__ import annotations

import math


def lr_factor(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up over `warmup` epochs, then cosine to zero at `total` epochs."""
    if progress < warmup:  # never 0 (the first step moves), never above 1
        return min(1.0, (progress + 1e-3) / warmup)
    span = max(total - warmup, 1e-8)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / span)))
