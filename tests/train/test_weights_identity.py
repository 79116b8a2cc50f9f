"""The package moves changed no number: the same seed gives bit-identical weights after 2
epochs to those recorded on the code before them (main at a4fda3c plus issue 26's fixes,
`tests/procs/weights_digest.py` run there with the old import paths, on this kind of machine:
x86_64, torch 2.14.1 CPU, one thread). Another CPU rounds otherwise: digests are kept per kind
of CPU, and a kind without any is skipped, saying so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROCS

# per kind of CPU: the same code and seed give other bits on another vector unit
BEFORE_THE_MOVE = {
    # recorded on the code before the move (the module docstring)
    "AuthenticAMD": {
        "model": "5265fe7f2bc67daa1f3fc9e5b111919fa32a6e928c97c5ea98ec77b7208a9b20",
        "ema": "83e2e0e57bf63744a65d7e39b87c238f4871cb4c73a117ca6e8c179db0530fc8",
    },
    # recorded on 285348c, whose weights on the AMD machines were the ones above
    "GenuineIntel avx512f": {
        "model": "3cd9a48bad2bab13ac1cfc634104bd47eaafb98f0708d3ef4c301b10840df795",
        "ema": "f33363b1e0e9f7f7a3b2ea49d0fbee1a6a12ae1361a7eae66c3cd744891f34f5",
    },
}
SCRIPT = PROCS / "weights_digest.py"


def cpu_kind() -> str:
    """The CPU's vendor, and for Intel whether it has AVX-512 (its kernels round otherwise)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    vendor = fields.get("vendor_id", "unknown")
    if vendor != "GenuineIntel":
        return vendor
    return f"{vendor} {'avx512f' if 'avx512f' in fields.get('flags', '').split() else 'no-avx512f'}"


@pytest.mark.multiproc
def test_two_epochs_give_the_weights_recorded_before_the_move(cpu_env):
    import torch

    if torch.__version__.split("+")[0] != "2.14.1":
        pytest.skip(f"the digests were recorded with torch 2.14.1, not {torch.__version__}")
    kind = cpu_kind()
    if kind not in BEFORE_THE_MOVE:
        pytest.skip(
            f"no digests recorded for this CPU ({kind}): run tests/procs/weights_digest.py here "
            "on a commit known to give the recorded ones elsewhere, and add them"
        )
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=cpu_env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("DIGEST ")]
    digests = {name: value for _, name, value in lines}
    assert digests == BEFORE_THE_MOVE[kind]
