"""The job step's supervisor: `python -m dtrain.launch.supervise --stop-file STOP COMMAND...`,
run by a batch script that turns its own warning signals into STOP.

SLURM warns a job before its time limit or a preemption with `--signal=B:USR1@<seconds>`, sent
to the batch shell only. The shell's `trap` creates a stop file that the training ranks on this
node read at their next log step (`DTRAIN_STOP_FILE`, dtrain.stop_signal); the shell traps from
its first line and waits for the supervisor, so no warning can fall between two programs'
handlers (an `exec`ed supervisor left one: a USR1 before its handlers were in place was lost).
Signalled itself, the supervisor creates the same file. The
ranks agree on one step, checkpoint and exit 0; then the supervisor requeues the job
(`scontrol requeue`) and exits 0. The requeued job runs the same script again with
`SLURM_RESTART_COUNT` > 0, and `dtrain train --resume auto` continues from `last.pt`.

A signal file rather than a signal to the ranks: torchrun, accelerate and the deepspeed launcher
stand between the batch shell and the ranks and would die of a USR1, or turn a TERM into a failed
job even after a clean checkpoint. A job that finishes while the warning is on its way is not
requeued: the ranks acknowledge an early stop with `<stop file>.stopped`, and only that requeues,
whatever the launcher's exit status (torchrun exits 1 after forwarding a TERM to ranks that then
checkpointed cleanly)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from dtrain.launch.slurm_env import ClusterUnavailable, scontrol_show
from dtrain.stop_signal import STOP_FILE_ENV, STOP_SIGNALS, acknowledgement


def _say(message: str) -> None:
    print(f"dtrain supervise: {message}", file=sys.stderr, flush=True)


def stop_file_for(env: dict[str, str]) -> Path:
    """Node-local, one per job start: the ranks on the first node see it at once, and a stale
    one from an earlier start cannot stop the next."""
    job = env.get("SLURM_JOB_ID", str(os.getpid()))
    restart = env.get("SLURM_RESTART_COUNT", "0")
    return Path(tempfile.gettempdir()) / f"dtrain-{job}.{restart}.stop"


def job_state(job_id: str) -> str:
    try:
        return scontrol_show("job", job_id)[0].get("JobState", "?")
    except (ClusterUnavailable, IndexError):
        return "?"


def requeue(job_id: str) -> int:
    """Requeue a job that is still running; one that is being cancelled (`scancel`, a
    preemption that cancels) stays cancelled, with its checkpoint."""
    state = job_state(job_id)
    if state != "RUNNING":
        _say(f"job {job_id} is {state}, not requeued; resubmit with --resume to continue")
        return 0
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        _say(
            f"scontrol requeue {job_id} failed ({result.stderr.strip()}); the checkpoint is "
            "saved: submit the same script again to continue"
        )
    return result.returncode


def supervise(command: list[str], env: dict[str, str], stop: Path | None = None) -> int:
    """Run `command` with the stop file in its environment; the exit status of the job.
    `stop`: the batch script's stop file, which may already hold a warning from its start-up;
    without it, a fresh one per job start (`stop_file_for`)."""
    if stop is None:
        stop = stop_file_for(env)
        stop.unlink(missing_ok=True)
    acknowledgement(stop).unlink(missing_ok=True)
    if stop.exists():
        _say("warned during start-up: the ranks will checkpoint and stop at their first log step")

    def on_warning(signum: int, frame: object) -> None:
        if not stop.exists():
            _say(f"{signal.Signals(signum).name}: asking the ranks to checkpoint and stop")
            stop.touch()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_warning)
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    _say(f"job {env.get('SLURM_JOB_ID', '?')} start {int(restarts) + 1}: {' '.join(command)}")
    # its own process group: a signal meant for the batch shell never reaches srun or the ranks
    child = subprocess.Popen(command, env={**env, STOP_FILE_ENV: str(stop)}, start_new_session=True)
    code = child.wait()
    stopped_early = acknowledgement(stop).exists()
    for path in (stop, acknowledgement(stop)):
        path.unlink(missing_ok=True)
    if code < 0:
        code = 128 - code
    if stopped_early:  # whatever the launcher made of it: torchrun exits 1 after a TERM
        _say(f"the ranks stopped at a checkpoint (exit {code}); requeueing the job to continue")
        return 1 if requeue(env["SLURM_JOB_ID"]) else 0
    if code != 0:
        _say(f"the job's command exited {code}")
    return code


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dtrain.launch.supervise", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--stop-file", type=Path, help="the batch script's stop file, created by its trap"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="COMMAND [ARGS...]")
    args = parser.parse_args()
    if not args.command:
        parser.error("no command to supervise")
    sys.exit(supervise(args.command, dict(os.environ), args.stop_file))


if __name__ == "__main__":
    main()
