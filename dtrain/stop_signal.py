"""Stop requests from outside the process: SIGTERM or SIGUSR1 (preemption, a time-limit
warning), or the stop file that a SLURM job's supervisor creates when the job is warned
(`dtrain.launch.supervise`). The trainer reads both on log steps and every rank stops at the same
step with a checkpoint.

The CLI installs the handlers before it imports anything heavy, so that a signal arriving while
dtrain starts (importing torch, reading shards) is kept and honoured at the first log step
instead of killing the process (Python's default for SIGUSR1)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_FILE_ENV = "DTRAIN_STOP_FILE"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

requested = threading.Event()


def _on_signal(signum: int, frame: object) -> None:
    requested.set()


def install_handlers() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def leave_to_the_parent() -> None:
    """In a DataLoader worker: ignore the stop signals. SLURM signals every process of a job step
    (`scancel --signal=TERM`, `scontrol requeue`, a preemption), and torch's workers die of a
    TERM that their rank did not send; the rank then crashes ("DataLoader worker ... is killed
    by signal") instead of checkpointing. The rank handles the signal and ends its workers
    itself (SIGINT stays as it is: the rank does not checkpoint on it, and a worker's
    KeyboardInterrupt ends quietly)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_file() -> Path | None:
    """The file whose appearance asks this run to stop, as the job script exported it."""
    path = os.environ.get(STOP_FILE_ENV)
    return Path(path) if path else None


def acknowledgement(path: Path) -> Path:
    """Where a run says it stopped early at a checkpoint (so the job requeues itself), as
    opposed to having finished while the request was on its way."""
    return path.with_name(path.name + ".stopped")


def restore_defaults() -> None:
    """For commands that do not checkpoint on request: a stop signal ends them as usual, and one
    that came during start-up is delivered now."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if requested.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
