"""What every benchmark repeats: the machine it ran on, the command and the date, the method
presets, a table printer, and writing benchmarks/results/<name>.json atomically.

The scripts import it as `from common import ...`: Python puts a script's own folder first on
sys.path, so `python benchmarks/<script>.py` finds it from any working directory."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from dtrain.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "configs"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*names: str) -> str | None:
    """The installed version of the first of `names` that is installed."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def device_name() -> str:
    """The first GPU's name, or `cpu-<N>cores`: what the result files of device-bound
    benchmarks are named after."""
    gpus = gpu_names()
    return gpus[0] if gpus else f"cpu-{os.cpu_count()}cores"


def slug(text: str) -> str:
    """A file-name-safe lower-case form: 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return text.replace(" ", "_").replace("/", "_").lower()


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPUs, python / platform and the torch, CUDA and Triton versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpus": gpu_names(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": None,
        "cuda": None,
        "triton": package_version("triton", "pytorch-triton"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def command_line() -> str:
    """The command as typed, quoted so that it can be pasted back into a shell."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", shown.as_posix(), *sys.argv[1:]])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def preset(method: str) -> Path:
    """configs/<method>.yaml: a benchmark selects a method through its preset (`--config`), never
    by `method.name=` alone, so that it gets the preset's settings too (afm: feature-only
    attention)."""
    path = CONFIGS / f"{method}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise SystemExit(f"no preset {path} for method {method!r}; presets: {known}")
    return path


def write_result(name: str, payload: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write `payload` plus the command, the date and the machine to
    benchmarks/results/<name>.json (or `path`), atomically; print where it went."""
    result = {
        **payload,
        "command": payload.get("command", command_line()),
        "date": now(),
        "machine": {**machine_info(), **payload.get("machine", {})},
    }
    out = write_json_atomic(Path(path) if path else RESULTS / f"{name}.json", result)
    print(f"wrote {out}")
    return out


@dataclass
class Column:
    title: str
    width: int
    fmt: str = ""  # a format spec without the width: ".1f", "d"; "" for text
    left: bool = False


class Table:
    """Fixed-width rows printed as they come (long benchmarks show progress):
    `table = Table(Column("B", 5, "d"), ...); table.header(); table.row(256, ...)`.
    None prints as an em dash."""

    def __init__(self, *columns: Column):
        self.columns = columns

    def _line(self, cells: list[str]) -> str:
        return " ".join(
            f"{cell:{'<' if c.left else '>'}{c.width}}"
            for c, cell in zip(self.columns, cells, strict=True)
        ).rstrip()

    def header(self) -> None:
        print(self._line([c.title for c in self.columns]))

    def row(self, *values: Any) -> None:
        print(
            self._line(
                [
                    "—" if v is None else format(v, c.fmt)
                    for c, v in zip(self.columns, values, strict=True)
                ]
            )
        )
