"""A real two-node SLURM cluster on this machine, for the launcher tests: munge, `slurmctld` and
two `slurmd -N n1|n2`, everything under one temporary folder, stopped by PID at the end.

The nodes' names (n1, n2) do not resolve; their `NodeAddr` is 127.0.0.1, as on clusters whose
node names are not the address to use. Each node advertises 8 fake "a100" GPUs (terminal devices
stand in for /dev/nvidia*), so that GPU requests are granted and SLURM sets its GPU variables.
Below it, what the tests do with it: launch a job, wait for it, read its log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
GPUS_PER_NODE = 8
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def missing_commands() -> list[str]:
    return [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]


def _munge_works() -> bool:
    if not MUNGE_SOCKET.exists() or shutil.which("munge") is None:
        return False
    probe = subprocess.run(["munge", "-n"], capture_output=True)
    return probe.returncode == 0


class SlurmCluster:
    """`start()` brings the cluster up and waits until both nodes are idle; `env` is what a
    client command needs (SLURM_CONF); `stop()` ends every daemon it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool/n1", "spool/n2", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(1 + len(NODES))]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={CPUS_PER_NODE} Gres=gpu:a100:{GPUS_PER_NODE} State=UNKNOWN"
            for n, p in zip(NODES, ports[1:], strict=True)
        )
        self.conf.write_text(
            f"""ClusterName=dtraintest
SlurmctldHost=localhost
SlurmctldPort={ports[0]}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        (r / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName=n[1-2] Name=gpu Type=a100 File=/dev/tty[0-{GPUS_PER_NODE - 1}]\n"
        )

    def _start_munge(self) -> None:
        if _munge_works():
            return  # a munged of this machine already answers; share it
        run_dir = MUNGE_SOCKET.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        self.daemons.append(self._daemon("munged", "runuser", "-u", "munge", "--", "munged", "-F"))
        self._wait(_munge_works, 20, "munged")

    def start(self) -> SlurmCluster:
        self._write_config()
        self._start_munge()
        self.daemons.append(self._daemon("slurmctld", "slurmctld", "-D", "-i"))
        for node in NODES:
            self.daemons.append(self._daemon(f"slurmd.{node}", "slurmd", "-D", "-N", node))
        self._wait(self._nodes_idle, 60, "both slurmd nodes idle")
        return self

    def _daemon(self, name: str, *command: str) -> subprocess.Popen:
        """A daemon in the foreground, its console output in log/<name>.console."""
        with open(self.root / "log" / f"{name}.console", "wb") as console:
            return subprocess.Popen(command, env=self.env, stdout=console, stderr=console)

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out.count("idle") == len(NODES)

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            for d in self.daemons:
                if d.poll() is not None:
                    raise RuntimeError(f"{d.args} exited {d.returncode}; logs in {self.root}/log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {seconds} s; logs in {self.root}/log")
            time.sleep(0.3)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=kw.pop("env", self.env), text=True, capture_output=True, check=check, **kw
        )

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: str, states: set[str], seconds: float = 300) -> dict[str, str]:
        """Poll until the job reaches one of `states`; a requeued job held until its begin time
        is released at once."""
        deadline = time.monotonic() + seconds
        held_since = None
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                held_since = held_since or time.monotonic()
                # slurmd refuses a credential issued in the second its job was requeued
                # ("Job credential revoked"): let that second pass and the nodes idle
                if time.monotonic() - held_since > 2 and self._nodes_idle():
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                    held_since = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {seconds} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for d in reversed(self.daemons):
            if d.poll() is None:
                d.send_signal(signal.SIGTERM)
        for d in self.daemons:
            try:
                d.wait(timeout=15)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()


ROOT = Path(__file__).resolve().parent.parent
DTRAIN = Path(sys.executable).parent / "dtrain"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def launch(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dtrain launch slurm ARGS` as a user would type it."""
    result = subprocess.run(
        [str(DTRAIN), "launch", "slurm", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def job_id(result: subprocess.CompletedProcess) -> str:
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def finished(cluster: SlurmCluster, job: str, log: Path, seconds: float = 300) -> dict:
    info = cluster.wait_job(job, ENDED, seconds)
    text = log.read_text() if log.exists() else "(no log)"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    return info


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.1)


def logged_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"kind": "step"' in metrics.read_text()
