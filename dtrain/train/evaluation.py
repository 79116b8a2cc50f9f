"""Predictions of a trained network over a split, every real sample once over all ranks, and
the metrics against the labels as shipped and against the clean ones."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from dtrain import distributed
from dtrain.dataset.loader import ShardLoader
from dtrain.train.engine import Engine
from dtrain.train.metrics import classification_metrics
from dtrain.train.report import progress


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    loader: ShardLoader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    show_progress: bool = False,
) -> dict[str, np.ndarray]:
    """Softmax outputs and labels of every real sample once, gathered over all ranks (one
    gather per batch; padding dropped after the gather). In one process also each sample's
    `key` (strings are not gathered: a multi-rank caller needs only the metrics)."""
    was_training = net.training
    net.eval()
    parts: list[torch.Tensor] = []
    keys: list[str] = []
    one_process = distributed.world()[1] == 1
    loader.set_epoch(0)
    bar = progress(len(loader), "predicting", enabled=show_progress)
    for batch in loader:
        with autocast():
            logits = net(batch["image"].to(device, non_blocking=True))
        columns = [batch[k].to(device).float()[:, None] for k in ("label", "clean_label", "valid")]
        parts.append(distributed.gather_cat(torch.cat([logits.float().softmax(-1), *columns], 1)))
        if one_process:
            keys += batch["key"]
        bar.update(1)
    bar.close()
    net.train(was_training)
    table = torch.cat(parts).cpu().numpy()
    real = table[:, -1] > 0.5
    table = table[real]
    out = {
        "probs": table[:, :-3],
        "label": table[:, -3].astype(np.int64),
        "clean_label": table[:, -2].astype(np.int64),
    }
    if one_process:
        out["key"] = np.asarray(keys, dtype=object)[real]
    return out


def prediction_metrics(p: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics against the labels as shipped (`*`) and against the clean ones (`clean_*`)."""
    shipped = classification_metrics(p["probs"], p["label"])
    clean = classification_metrics(p["probs"], p["clean_label"])
    return {**shipped, **{f"clean_{k}": v for k, v in clean.items()}, "samples": len(p["label"])}


def evaluate(
    engine: Engine, loader: ShardLoader, net: torch.nn.Module | None = None
) -> dict[str, float]:
    """`prediction_metrics` of `net` (default: the engine's network) on a split (collective
    over the ranks)."""
    net = engine.unwrap().net if net is None else net
    return prediction_metrics(predict(net, loader, engine.device, engine.autocast))
