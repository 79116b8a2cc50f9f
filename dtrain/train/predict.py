"""Predictions of a trained network over a split, every real sample once over all ranks, and
the metrics against the labels as shipped and against the clean ones."""

from __future__ import annotations

import numpy as np
import torch

from dtrain import distributed
from dtrain.train.data import ShardLoader
from dtrain.train.engine import Engine
from dtrain.train.metrics import classification_metrics


@torch.no_grad()
def predict(engine: Engine, loader: ShardLoader) -> dict[str, np.ndarray]:
    """Softmax outputs and labels of every real sample once, gathered over all ranks (one
    gather per batch; padding dropped after the gather)."""
    net = engine.unwrap().net
    was_training = net.training
    net.eval()
    parts: list[torch.Tensor] = []
    device = engine.device
    loader.set_epoch(0)
    for batch in loader:
        with engine.autocast():
            logits = net(batch["image"].to(device, non_blocking=True))
        columns = [batch[k].to(device).float()[:, None] for k in ("label", "clean_label", "valid")]
        parts.append(distributed.gather_cat(torch.cat([logits.float().softmax(-1), *columns], 1)))
    net.train(was_training)
    table = torch.cat(parts).cpu().numpy()
    table = table[table[:, -1] > 0.5]
    return {
        "probs": table[:, :-3],
        "label": table[:, -3].astype(np.int64),
        "clean_label": table[:, -2].astype(np.int64),
    }


def evaluate(engine: Engine, loader: ShardLoader) -> dict[str, float]:
    """Metrics against the labels as shipped (`*`) and against the clean ones (`clean_*`)."""
    p = predict(engine, loader)
    shipped = classification_metrics(p["probs"], p["label"])
    clean = classification_metrics(p["probs"], p["clean_label"])
    return {**shipped, **{f"clean_{k}": v for k, v in clean.items()}, "samples": len(p["label"])}
