"""The package moves changed no number: the same seed gives bit-identical weights after 2
epochs to those recorded on the code before them (main at a4fda3c plus issue 26's fixes,
`tests/procs/weights_digest.py` run there with the old import paths, on this kind of machine:
x86_64, torch 2.14.1 CPU, one thread)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import PROCS

BEFORE_THE_MOVE = {
    "model": "5265fe7f2bc67daa1f3fc9e5b111919fa32a6e928c97c5ea98ec77b7208a9b20",
    "ema": "83e2e0e57bf63744a65d7e39b87c238f4871cb4c73a117ca6e8c179db0530fc8",
}
SCRIPT = PROCS / "weights_digest.py"


@pytest.mark.multiproc
def test_two_epochs_give_the_weights_recorded_before_the_move(cpu_env):
    import torch

    if torch.__version__.split("+")[0] != "2.14.1":
        pytest.skip(f"the digests were recorded with torch 2.14.1, not {torch.__version__}")
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=cpu_env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("DIGEST ")]
    digests = {name: value for _, name, value in lines}
    assert digests == BEFORE_THE_MOVE
