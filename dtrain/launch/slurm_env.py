"""What a job script needs from SLURM before it starts the training processes, printed as shell
`export` lines (`eval "$(python -m dtrain.launch.slurm_env)"`):

- `MASTER_ADDR`: an address of the first node that the other nodes can reach. A node's *name*
  often does not resolve, or resolves to the wrong interface, so this is its `NodeAddr` where
  SLURM has one that differs from the name, else (on the first node itself, where the batch
  script runs) the address this node uses to reach the controller, else the name resolved.
- `MASTER_PORT`: one per job, so that two jobs sharing a node do not collide, and below Linux's
  ephemeral ports (32768 and up), which the system hands out to any outgoing connection.
- `NPROC_PER_NODE`: GPUs granted on this node (`SLURM_GPUS_ON_NODE`, which SLURM sets for
  `--gres=gpu:N`, `--gpus-per-node=N` and typed `a100:N` alike), or 1 on CPU nodes.
- `OMP_NUM_THREADS`: the task's CPUs shared among the processes it starts (kept if set).
- `DTRAIN_EXPORTS_JOB`: the job these values were made for (dtrain.distributed trusts them only
  inside that job).

The first three are always the job's own: sbatch's default `--export=ALL` hands a job whatever
the submitting shell exported (a stale `MASTER_PORT` from an earlier torchrun, say). To choose
one, export `DTRAIN_MASTER_ADDR`, `DTRAIN_MASTER_PORT` or `DTRAIN_NPROC_PER_NODE` instead."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import socket
import subprocess

from dtrain.errors import DistributedError


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM host list, as `scontrol show hostnames` lists them:
    `gpu[03-05,09],cpu1` -> gpu03 gpu04 gpu05 gpu09 cpu1; `node-[1-2]-ib` -> node-1-ib node-2-ib;
    `a[1-2]b[3-4]` -> a1b3 a1b4 a2b3 a2b4."""
    item = r"(?:[^,\[\]\s]|\[[^\[\]]+\])+"  # names and [ranges], e.g. node-[1-2]-ib
    if not re.fullmatch(f"{item}(?:,{item})*", nodelist.strip()):
        raise DistributedError(f"cannot read the SLURM node list {nodelist!r}")
    hosts: list[str] = []
    for host in re.findall(item, nodelist):
        parts = re.split(r"\[([^\]]*)\]", host)  # literal, ranges, literal, ..., literal
        choices = [
            [text] if i % 2 == 0 else _expand_ranges(text, nodelist) for i, text in enumerate(parts)
        ]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """`03-05,09` -> 03 04 05 09 (a range keeps its start's zero padding)."""
    out = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise DistributedError(f"cannot read the SLURM node list {nodelist!r}")
        start, end = match.group(1), match.group(2) or match.group(1)
        out += [str(n).zfill(len(start)) for n in range(int(start), int(end) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames`'s where SLURM is installed
    (it knows every form the cluster's SLURM accepts), else `expand_hostlist`'s."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return expand_hostlist(nodelist)[0]
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else expand_hostlist(nodelist)[0]


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
            "DTRAIN_MASTER_ADDR (an address of the first node that the others can reach) in the "
            "job script"
        )
    return resolved


def head_address(nodelist: str, this_node: str | None) -> str:
    """The rendezvous address: the job's first node's."""
    return node_address(first_host(nodelist), this_node)


# the job's rendezvous port: at or above 20000 (Ray's worker ports end at 19999), below 32768
PORT_BASE, EPHEMERAL_PORTS_START = 20000, 32768
EXPORTS_JOB = "DTRAIN_EXPORTS_JOB"


def job_port(job_id: int) -> int:
    """One port per job, below Linux's ephemeral range: a port in it may already be held by any
    outgoing connection on the node, and the rendezvous would fail to bind."""
    return PORT_BASE + job_id % (EPHEMERAL_PORTS_START - PORT_BASE)


def rendezvous_exports(env: dict[str, str], nodelist: str) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT of the job in `env`: its first node and its port, or what the
    user chose with DTRAIN_MASTER_ADDR / DTRAIN_MASTER_PORT; never inherited values."""
    return {
        "MASTER_ADDR": env.get("DTRAIN_MASTER_ADDR")
        or head_address(nodelist, env.get("SLURMD_NODENAME")),
        "MASTER_PORT": env.get("DTRAIN_MASTER_PORT") or str(job_port(int(env["SLURM_JOB_ID"]))),
    }


def env_from_slurm() -> bool:
    """Started by `srun` directly (no torchrun / accelerate / deepspeed launcher): derive RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables, as open_clip does.
    Returns whether it did. A launcher's own variables always win; MASTER_ADDR and MASTER_PORT
    are kept only where the job script made them for this job (`job_exports`'s
    DTRAIN_EXPORTS_JOB)."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return False
    if int(env.get("SLURM_NTASKS", "1")) < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    # the job script's exports (launchers/) are this job's; any other MASTER_ADDR or MASTER_PORT
    # may have been inherited from the submitting shell (sbatch's --export=ALL): not trusted
    if EXPORTS_JOB not in env or env[EXPORTS_JOB] != env.get("SLURM_JOB_ID"):
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
        env.update(rendezvous_exports({"SLURM_JOB_ID": "0", **env}, nodelist))
    return True


def job_exports(env: dict[str, str], per_node_launcher: bool) -> dict[str, str]:
    """The variables of the module docstring, for a job step's environment `env`."""
    if "SLURM_JOB_NODELIST" not in env:
        raise DistributedError("not inside a SLURM job (SLURM_JOB_NODELIST is not set)")
    gpus = int(env.get("SLURM_GPUS_ON_NODE") or 0)
    nproc = int(env.get("DTRAIN_NPROC_PER_NODE") or max(gpus, 1))
    out = {
        **rendezvous_exports(env, env["SLURM_JOB_NODELIST"]),
        "NPROC_PER_NODE": str(nproc),
        EXPORTS_JOB: env["SLURM_JOB_ID"],
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
