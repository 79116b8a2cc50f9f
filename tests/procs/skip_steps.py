"""Run by torchrun for tests/train/test_train_skips.py: rank 0 poisons the given (1-based) calls
of the CE step, either its loss (NaN) or one image of its input (a NaN activation that reaches
the batch-norm statistics), and writes the network and its average after every optimiser step.

    skip_steps.py OUT KIND CALLS dtrain-overrides..."""

from __future__ import annotations

import os
import sys

import torch


def poison(kind: str, calls: set[int]) -> None:
    """Fault injection into the CE step of this process."""
    from dtrain.methods import steps

    original, count = steps.ce_step, [0]

    def step(model, batch, ctx):
        count[0] += 1
        if count[0] in calls and kind == "input":
            batch = {**batch, "view1": batch["view1"].clone()}
            batch["view1"][0] = float("nan")
        out = original(model, batch, ctx)
        if count[0] in calls and kind == "loss":
            out.loss = out.loss * float("nan")
        return out

    steps.ce_step = step


def train(out: str, kind: str, calls: str, overrides: list[str]) -> None:
    from dtrain.config import load_config
    from dtrain.train.resolve import resolve
    from dtrain.train.trainer import Trainer

    if os.environ.get("RANK", "0") == "0":
        poison(kind, {int(c) for c in calls.split(",")})
    states = []

    def record(info) -> None:
        ema = trainer.ema.net.state_dict() if trainer.ema is not None else {}
        states.append(
            {
                "step": info.step,
                "net": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                "ema": {k: v.clone() for k, v in ema.items()},
            }
        )

    trainer = Trainer(resolve(load_config(None, overrides)), on_step=record)
    trainer.fit()
    if os.environ.get("RANK", "0") == "0":
        torch.save(states, out)


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
