"""`dtrain eval RUN_DIR`: a finished run's checkpoint on any split of its dataset."""

from __future__ import annotations

import json
from pathlib import Path

from dtrain.config import load_config
from dtrain.errors import RunFolderError
from dtrain.train.checkpoint import load_checkpoint
from dtrain.train.trainer import Trainer


def evaluate_run(run_dir: str | Path, split: str = "test", which: str = "best") -> dict:
    """Metrics of `which` checkpoint (best or last) of a finished run on one split, printed as
    JSON; one process reads the consolidated weights however the run was trained."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} holds no config.yaml: not a dtrain run folder")
    # one process reads the consolidated weights in best.pt/last.pt, however the run was trained
    config = load_config(
        config_path,
        [
            f"train.run_dir={run_dir}",
            "train.progress=false",
            "train.deepspeed=",
        ],
    )
    trainer = Trainer(config, resume=True)
    trainer.build()
    ckpt = load_checkpoint(run_dir / f"{which}.pt")
    trainer.net.load_state_dict(ckpt["model"])
    metrics = trainer.evaluate(trainer.loader(split, train=False))
    if trainer.is_main:
        print(
            json.dumps(
                {"run": str(run_dir), "checkpoint": which, "split": split, **metrics}, indent=2
            )
        )
    trainer.engine.close()
    return metrics
