"""Launched (accelerate launch, torchrun) as `python tests/procs/rank_labels.py OUT_DIR
dtrain-train-arguments...`: `dtrain train` that also writes, per rank, what each of its trainings
(one per label clean-up round) trained on: `OUT_DIR/rank<R>.json`, a list over the rounds of
{"relabel": the corrected labels it was handed, "seen": {sample key: label it trained with}}.
tests/train/test_distributed.py checks that every rank, not only rank 0, trained on the
corrections."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def record_trainings(rounds: list[dict]) -> None:
    """Each train loader a Trainer builds records the labels of the real samples it yields."""
    from dtrain.train.trainer import Trainer

    build_loader = Trainer.loader

    def loader(self, split: str, train: bool):
        made = build_loader(self, split, train)
        if not train:
            return made
        seen: dict[str, int] = {}
        rounds.append({"relabel": dict(sorted((self.relabel or {}).items())), "seen": seen})

        class Recording(type(made)):
            def __iter__(self):
                for batch in super().__iter__():
                    for key, label, valid in zip(
                        batch["key"], batch["label"].tolist(), batch["valid"].tolist(), strict=True
                    ):
                        if valid:
                            seen[key] = label
                    yield batch

        made.__class__ = Recording
        return made

    Trainer.loader = loader


if __name__ == "__main__":
    out, rounds = Path(sys.argv[1]), []
    record_trainings(rounds)
    from dtrain.commands.main import main

    try:
        main(["train", *sys.argv[2:]])
    finally:
        (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(rounds))
