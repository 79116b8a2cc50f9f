"""The training side: `train(config)`, the one way in for the command line, Ray Tune trials,
SLURM jobs and Python; the loop (`trainer`), its engines, checkpoints, model selection, clean-up
rounds and report."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtrain.config import Config
    from dtrain.train.trainer import EpochHook, StepHook


def train(
    config: Config,
    *,
    resume: bool = False,
    on_epoch_end: EpochHook | None = None,
    on_step: StepHook | None = None,
    stop: threading.Event | None = None,
    stop_file: Path | None = None,
    say_resume: bool = False,
) -> dict:
    """Resolve `config` once (`dtrain.train.resolve`: validation, the job's processes, the
    DeepSpeed file), then train it, its label clean-up rounds included; returns the summary
    (`{"stopped": ...}` when a stop request ended it early). `on_epoch_end(record, last_pt)`
    and `on_step(StepInfo)` are called by the loop; a set `stop` or the appearance of
    `stop_file` checkpoints and returns at the next log step. Imported on call: importing the
    package stays cheap for the commands that only parse arguments."""
    from dtrain.train.resolve import resolve
    from dtrain.train.rounds import fit_rounds

    return fit_rounds(
        resolve(config),
        resume=resume,
        stop=stop,
        stop_file=stop_file,
        say_resume=say_resume,
        on_epoch_end=on_epoch_end,
        on_step=on_step,
    )
