"""`dtrain launch slurm`: a job script rendered from a template in `launchers/`, checked
against the partition, and submitted with `sbatch`.

Rendering sets the template's `#SBATCH` lines from the request (nodes, GPUs, CPUs, time,
partition, the warning signal, a log in the run folder), writes the dtrain arguments into the
script (`set -- ...`, so a requeued job runs exactly the same command) and points the script at
the Python environment that rendered it. Everything else in the template stays as shipped."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dtrain.errors import ConfigError
from dtrain.launch.slurm_env import ClusterUnavailable, scontrol_show

LAUNCHERS_DIR = Path(__file__).resolve().parents[2] / "launchers"
TrainLauncher = Literal["torchrun", "srun", "accelerate", "deepspeed"]
TRAIN_LAUNCHERS: tuple[str, ...] = get_args(TrainLauncher)
DIRECTIVE = re.compile(r"^#+SBATCH\s+--([\w-]+)(?:=(.*))?$")
GRES_GPU = re.compile(r"gpu(?::([\w.-]+))?:(\d+)")
GPUS_PER_NODE = re.compile(r"(?:([\w.-]+):)?(\d+)")
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def time_seconds(value: str) -> int:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = SLURM_TIME.fullmatch(value)
    if match is None:
        raise ConfigError(f"--time {value!r}: expected minutes, H:M:S or D-H:M:S")
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:  # H:M:S
        hours, minutes, seconds = int(first), int(second), int(third)
    else:  # M or M:S
        hours, minutes, seconds = 0, int(first), int(second or 0)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass
class JobRequest:
    """What the user asked for; `None` keeps the template's value (or leaves the option out)."""

    launcher: str  # one of TRAIN_LAUNCHERS, or "ray_tune"
    nodes: int = 1
    gpus_per_node: str = "0"  # "8" or typed "a100:8"; "0": CPU nodes
    gres: str | None = None  # instead of gpus_per_node: "gpu:8" or "gpu:a100:8"
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    warning_s: int = 300
    gpu_type: str = field(init=False)  # "" for any type
    gpus: int = field(init=False)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: must be >= 1")
        if self.gres is not None:
            match = GRES_GPU.fullmatch(self.gres)
            flag, example = "--gres", "gpu:8 or gpu:a100:8"
        else:
            match = GPUS_PER_NODE.fullmatch(self.gpus_per_node)
            flag, example = "--gpus-per-node", "8 or a100:8 (0: CPU nodes)"
        if match is None:
            value = self.gres if self.gres is not None else self.gpus_per_node
            raise ConfigError(f"{flag} {value!r}: expected {example}")
        self.gpu_type, self.gpus = match.group(1) or "", int(match.group(2))
        if self.time is not None and time_seconds(self.time) <= self.warning_s:
            raise ConfigError(
                f"--time {self.time} is not longer than --warning-seconds {self.warning_s}: "
                "every start would be warned at once"
            )

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU without a per-node launcher (srun), else one per node."""
        return max(self.gpus, 1) if self.launcher == "srun" else 1

    def template(self) -> Path:
        return LAUNCHERS_DIR / f"slurm_{self.launcher}.sbatch"


@dataclass
class NodeShape:
    name: str
    cpus: int
    gpus: dict[str, int]  # per type; "" counts every GPU of the node


def parse_gres(gres: str) -> dict[str, int]:
    """`gpu:a100:8(S:0-1),gpu:2` -> {"a100": 8, "": 10}."""
    counts: dict[str, int] = {"": 0}
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        count = int(parts[-1])
        counts[""] += count
        if len(parts) == 3:
            counts[parts[1]] = counts.get(parts[1], 0) + count
    return counts


def partition_nodes(partition: str | None) -> tuple[str, list[NodeShape]]:
    """The partition (the default one if None) and the shape of each of its nodes."""
    parts = scontrol_show("partition")
    chosen = [
        p
        for p in parts
        if (p.get("PartitionName") == partition if partition else p.get("Default") == "YES")
    ]
    if not chosen:
        names = ", ".join(p.get("PartitionName", "?") for p in parts)
        wanted = f"partition {partition!r}" if partition else "a default partition"
        raise ConfigError(f"SLURM has no {wanted}; its partitions: {names} (--partition)")
    part = chosen[0]
    listing = subprocess.run(
        ["sinfo", "-h", "-N", "-p", part["PartitionName"], "-o", "%N"],
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0:
        raise ClusterUnavailable(f"sinfo -p {part['PartitionName']} failed: {listing.stderr}")
    hosts = set(listing.stdout.split())
    shapes = [
        NodeShape(n["NodeName"], int(n.get("CPUTot", 0)), parse_gres(n.get("Gres", "")))
        for n in scontrol_show("node")
        if n.get("NodeName") in hosts
    ]
    return part["PartitionName"], shapes


def fit_to_partition(request: JobRequest, partition: str, nodes: list[NodeShape]) -> None:
    """Refuse a request no `request.nodes` nodes of the partition can hold (SLURM would leave
    it pending forever); choose CPUs per task when not given: the node's share per task."""
    if request.nodes > len(nodes):
        raise ConfigError(
            f"--nodes {request.nodes}: partition {partition} has {len(nodes)} node(s)"
        )
    tasks = request.tasks_per_node
    with_gpus = [n for n in nodes if n.gpus.get(request.gpu_type, 0) >= request.gpus]
    if len(with_gpus) < request.nodes:
        most = max((n.gpus.get(request.gpu_type, 0) for n in nodes), default=0)
        kind = f"{request.gpu_type} GPUs" if request.gpu_type else "GPUs"
        raise ConfigError(
            f"{request.gpus} {kind} per node: the nodes of partition {partition} have at most "
            f"{most}"
        )
    if request.cpus_per_task is None:
        request.cpus_per_task = max(1, sorted(n.cpus for n in with_gpus)[-request.nodes] // tasks)
    need = request.cpus_per_task * tasks
    if sum(n.cpus >= need for n in with_gpus) < request.nodes:
        most = max(n.cpus for n in with_gpus)
        raise ConfigError(
            f"--cpus-per-task {request.cpus_per_task} x {tasks} task(s) per node = {need} CPUs: "
            f"the nodes of partition {partition} have at most {most}; lower --cpus-per-task"
        )


def check_train_shards(data_path: str, request: JobRequest, num_workers: int) -> None:
    """Refuse a job whose ranks would all fail at start: each of its ranks x loader workers
    reads shards of its own, so the train split needs at least that many. Checked where the
    dataset's `dataset.json` can be read here (not the embedded default, prepared by the job,
    nor a folder only the compute nodes see)."""
    meta = Path(data_path) / "dataset.json" if data_path else None
    if meta is None or not meta.is_file():
        return
    try:
        shards = json.loads(meta.read_text())["shards"].values()
        train = sum(info.get("split") == "train" for info in shards)
    except (OSError, ValueError, KeyError, AttributeError):
        return  # `dtrain train` says what is wrong with it, with its own checks
    ranks = request.nodes * max(request.gpus, 1)
    workers = max(1, num_workers)
    if train < ranks * workers:
        raise ConfigError(
            f"{train} train shards in {data_path} cannot feed {ranks} ranks x {workers} workers "
            f"= {ranks * workers} readers; ask for fewer nodes or GPUs, lower data.num_workers, "
            "write more, smaller shards (dtrain prepare --shard-size), or set data.resampled=true"
        )


def directives(request: JobRequest, log: Path) -> dict[str, str | None]:
    """The `#SBATCH` options to set; None removes the option from the script."""
    gpu_option = None if request.gres or request.gpus == 0 else request.gpus_per_node
    values: dict[str, str | None] = {
        "nodes": str(request.nodes),
        "ntasks-per-node": str(request.tasks_per_node),
        "gpus-per-node": gpu_option,
        "gres": request.gres,
        "output": shlex.quote(str(log)),
    }
    if request.cpus_per_task:  # else the template's own
        values["cpus-per-task"] = str(request.cpus_per_task)
    if request.launcher != "ray_tune":
        values["signal"] = f"B:USR1@{request.warning_s}"
    for key in ("time", "partition", "account", "job-name"):
        value = getattr(request, key.replace("-", "_"))
        if value is not None:
            values[key] = value
    return values


def render(template: str, options: dict[str, str | None], args: list[str], bin_dir: Path) -> str:
    """The template with its `#SBATCH` lines set from `options`, the arguments written in and
    the environment pointed at `bin_dir`."""
    lines, last_directive, seen = [], 0, set()
    for line in template.splitlines():
        match = DIRECTIVE.match(line)
        if match and match.group(1) in options:
            key = match.group(1)
            seen.add(key)
            if options[key] is None:
                continue
            line = f"#SBATCH --{key}={options[key]}"
        if match:
            last_directive = len(lines) + 1
        if line.startswith("# ARGS:"):
            line = "set -- " + shlex.join(args)
        line = re.sub(r"\$\{DTRAIN_BIN:-[^}]*\}", f"${{DTRAIN_BIN:-{bin_dir}}}", line)
        lines.append(line)
    extra = [f"#SBATCH --{k}={v}" for k, v in options.items() if k not in seen and v is not None]
    lines[last_directive:last_directive] = extra
    return "\n".join(lines) + "\n"


def python_bin() -> Path:
    """The folder of the interpreter running dtrain (a venv's bin/: its python, torchrun, ...)."""
    return Path(sys.executable).parent.absolute()


def submit(script: Path) -> str:
    """`sbatch` the script from the current folder; the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise ConfigError(f"sbatch {script} refused the job: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
