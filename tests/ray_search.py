"""Real `dtrain tune` searches for the tests: a search file, the command line, and what a
search folder holds (Tune's reports, each trial's epochs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import small_overrides

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def write_search(path: Path, space: dict, **search) -> Path:
    path.write_text(yaml.safe_dump({"space": space, "search": search}))
    return path


def tune_command(search_file: Path, data: Path, storage: Path, *extra: str) -> list[str]:
    """`dtrain tune` on the small test config; `extra` holds overrides and `--flags`."""
    overrides = [o for o in small_overrides(data, Path("unused"), 16) if "run_dir" not in o]
    overrides += [e for e in extra if not e.startswith("--")]
    flags = [e for e in extra if e.startswith("--")]
    return [
        str(BIN / "dtrain"),
        "tune",
        str(search_file),
        *overrides,
        f"--storage-path={storage}",
        *flags,
    ]


def run(command: list[str], env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def reported(folder: Path) -> bool:
    """Whether Tune has taken in a trial's first report (it writes result.json as it does; a
    checkpoint folder alone may still be being copied)."""
    results = list(folder.glob("run_trial_*/result.json"))
    return bool(results) and bool(results[0].read_text().strip())


def epoch_lines(run_dir: Path) -> list[str]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if '"kind": "epoch"' in line]


def epoch_records(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in epoch_lines(run_dir)]
