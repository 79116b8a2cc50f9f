"""dtrain: medical image classifiers that stay accurate under label noise, at cluster scale."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dtrain.runs.inference import Preprocess

__version__ = "0.1.0"


def load(
    run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Preprocess]:
    """`(model, preprocess)` of a trained run: `model(preprocess(pil_image))` gives logits over
    `preprocess.classes` (dtrain.runs.inference.load). torch is imported on the first call, not by
    `import dtrain`; by name, because every module that imports `dtrain.distributed` goes
    through this package and a plain import here would close a circle."""
    return importlib.import_module("dtrain.runs.inference").load(run_dir, checkpoint, device)
