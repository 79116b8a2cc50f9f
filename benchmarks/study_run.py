"""One run of the study (`benchmarks/study.py`), in its own process: train a method, and after
every epoch score the clean test labels with the trained weights and with their moving average,
so that every selection rule's pick can be scored afterwards without training again. Writes
`study.json` into the run folder last: its presence marks the run done.

    python benchmarks/study_run.py RUN_DIR PRESET [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dtrain.config import load_config
from dtrain.files import write_json_atomic
from dtrain.train import selection, train
from dtrain.train.resolve import resolve
from dtrain.train.trainer import Trainer

CLEAN = ("clean_accuracy", "clean_balanced_accuracy")


def train_with_epoch_tests(config) -> tuple[dict, list[dict]]:
    trainer: Trainer
    tests: list[dict] = []

    def on_epoch_end(record: dict, _last: Path) -> None:
        raw = trainer.evaluate(trainer.test_loader)
        row = {"epoch": record["epoch"], **{f"raw_{k}": raw[k] for k in CLEAN}}
        if trainer.ema is not None:
            ema = trainer.evaluate(trainer.test_loader, trainer.ema.net)
            row |= {f"ema_{k}": ema[k] for k in CLEAN}
        tests.append(row)

    trainer = Trainer(resolve(config), on_epoch_end=on_epoch_end)
    return trainer.fit(), tests


def rule_scores(history: list[dict], tests: list[dict], window: int) -> dict:
    """Each selection rule's pick in this run and its clean test accuracy."""
    out = {}
    for rule, spec in selection.RULES.items():
        epoch = selection.picks(rule, history, window)  # None: the rule picked no epoch
        test = tests[epoch - 1] if epoch is not None else {}
        out[rule] = {
            "epoch": epoch,
            **{k: test.get(f"{spec.weights}_{k}") for k in CLEAN},
        }
    return out


def main() -> None:
    run_dir, preset, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    config = load_config(preset, [*overrides, f"train.run_dir={run_dir}", "train.progress=false"])
    started = time.perf_counter()
    if config.train.refine_rounds:
        summary, rules = train(config), {}
    else:
        summary, tests = train_with_epoch_tests(config)
        history = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"kind": "epoch"' in line
        ]
        rules = rule_scores(history, tests, config.train.select_window)
        write_json_atomic(run_dir / "epoch_tests.json", tests)
    record = {
        "wall_seconds": time.perf_counter() - started,
        "select": config.train.select,
        "test_best": {k: (summary.get("test_best") or {}).get(k) for k in CLEAN},
        "test_last": {k: (summary.get("test_last") or {}).get(k) for k in CLEAN},
        "test_ema_last": {k: (summary.get("test_ema_last") or {}).get(k) for k in CLEAN},
        "mislabel_auroc": summary.get("mislabel_auroc", {}),
        "rules": rules,
        "rounds": summary.get("rounds", []),
    }
    write_json_atomic(run_dir / "study.json", record)


if __name__ == "__main__":
    main()
