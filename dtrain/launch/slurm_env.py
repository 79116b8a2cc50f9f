"""What a job script needs from SLURM before it starts the training processes, printed as shell
`export` lines (`eval "$(python -m dtrain.launch.slurm_env)"`):

- `MASTER_ADDR`: an address of the first node that the other nodes can reach. A node's *name*
  often does not resolve, or resolves to the wrong interface, so this is its `NodeAddr` where
  SLURM has one that differs from the name, else (on the first node itself, where the batch
  script runs) the address this node uses to reach the controller, else the name resolved.
- `MASTER_PORT`: one per job, so that two jobs sharing a node do not collide.
- `NPROC_PER_NODE`: GPUs granted on this node (`SLURM_GPUS_ON_NODE`, which SLURM sets for
  `--gres=gpu:N`, `--gpus-per-node=N` and typed `a100:N` alike), or 1 on CPU nodes.
- `OMP_NUM_THREADS`: the task's CPUs shared among the processes it starts.

A value already in the environment is kept: set it in the script to override."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess

from dtrain.errors import DistributedError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,09],cpu1` -> `gpu03`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise DistributedError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


class ClusterUnavailable(DistributedError):
    """No SLURM to ask here (`dtrain launch slurm --dry-run` may go on without it)."""


def scontrol_show(*args: str) -> list[dict[str, str]]:
    """`scontrol show ARGS -o`: one dict of its `key=value` fields per record."""
    try:
        out = subprocess.run(
            ["scontrol", "show", *args, "-o"], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError as err:
        raise ClusterUnavailable("scontrol is not on PATH: run this on a SLURM login node") from err
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ClusterUnavailable(f"scontrol show {' '.join(args)}: {err}") from err
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["no output"]
        raise ClusterUnavailable(f"scontrol show {' '.join(args)} failed: {lines[-1]}")
    return [
        dict(f.split("=", 1) for f in line.split() if "=" in f)
        for line in out.stdout.splitlines()
        if line.strip()
    ]


def _resolve(host: str) -> str | None:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        return None


def _address_towards(host: str) -> str | None:
    """The local address of the interface that routes to `host` (no packet is sent)."""
    target = _resolve(host)
    if target is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
            return s.getsockname()[0]
        except OSError:
            return None


def _controller_host() -> str | None:
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)]+)\))?", out, re.M)
    return (match.group(2) or match.group(1)) if match else None


def node_address(node: str, this_node: str | None) -> str:
    """An address of `node` that the other nodes can reach (see the module docstring)."""
    try:
        node_addr = scontrol_show("node", node)[0].get("NodeAddr")
    except (ClusterUnavailable, IndexError):
        node_addr = None  # no SLURM to ask: the name, resolved
    if node_addr and node_addr != node:
        return _resolve(node_addr) or node_addr
    if this_node == node:
        controller = _controller_host()
        own = _address_towards(controller) if controller else None
        if own:
            return own
    resolved = _resolve(node)
    if resolved is None:
        raise DistributedError(
            f"node {node!r} has no NodeAddr in SLURM and its name does not resolve; export "
            "MASTER_ADDR (an address of the first node that the others can reach) in the job script"
        )
    return resolved


def head_address(nodelist: str, this_node: str | None) -> str:
    """The rendezvous address: the job's first node's."""
    return node_address(first_host(nodelist), this_node)


def job_exports(env: dict[str, str], per_node_launcher: bool) -> dict[str, str]:
    """The variables of the module docstring, for a job step's environment `env`."""
    if "SLURM_JOB_NODELIST" not in env:
        raise DistributedError("not inside a SLURM job (SLURM_JOB_NODELIST is not set)")
    gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
    nproc = max(gpus, 1)
    out = {
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or head_address(env["SLURM_JOB_NODELIST"], env.get("SLURMD_NODENAME")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
        "NPROC_PER_NODE": env.get("NPROC_PER_NODE") or str(nproc),
    }
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" in env:
        out["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    elif cpus:
        out["OMP_NUM_THREADS"] = str(max(1, int(cpus) // (nproc if per_node_launcher else 1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dtrain.launch.slurm_env", description=__doc__)
    parser.add_argument(
        "--per-node",
        action="store_true",
        help="one task per node starts NPROC_PER_NODE processes (torchrun, accelerate, "
        "deepspeed): each gets its share of the task's CPUs",
    )
    parser.add_argument(
        "--node-address",
        action="store_true",
        help="print only this node's reachable address (torchrun --local_addr: the c10d "
        "rendezvous otherwise hands the workers this node's hostname)",
    )
    args = parser.parse_args()
    try:
        if args.node_address:
            print(node_address(os.environ["SLURMD_NODENAME"], os.environ["SLURMD_NODENAME"]))
            return
        exports = job_exports(dict(os.environ), args.per_node)
    except DistributedError as err:
        raise SystemExit(f"dtrain.launch.slurm_env: error: {err}") from err
    for key, value in exports.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
