"""Run `dtrain train ARGS...` and hurt it at a chosen point: kill this very process with
SIGKILL, or fill its disk.

    python tests/procs/hurt.py POINT STEP -- train arguments...

POINT is where, counted from the global optimiser step STEP (the steps a resumed run already
had count too): `step` right after step STEP; `forward` inside the next training forward pass
after it (at its first batch-norm layer); `eval` inside the first evaluation forward pass after
it (validation at the epoch's end); `test` inside the first evaluation forward pass after the
next checkpoint (the last epoch's, then the final test); `save` half-way through writing the
next checkpoint after it; `fill` (no kill) fills the run folder's filesystem at the step after
the next checkpoint after it, leaving room for half a checkpoint. The hooks are torch's global ones
(optimiser step, module forward) and a wrapped `torch.save`: dtrain itself runs unchanged."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fill(folder: Path, leave: int) -> None:
    """A file beside the run folder that takes all but `leave` bytes of its filesystem."""
    with open(folder.parent / "filler", "wb") as handle:
        handle.truncate(0)
        handle.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))


def steps_already_taken(args: list[str], run_dir: Path) -> int:
    last = run_dir / "last.pt"
    if "--resume" not in args or not last.exists():
        return 0
    return int(torch.load(last, weights_only=True)["state"]["step"])


def main() -> None:
    point, step, separator, *args = sys.argv[1:]
    assert separator == "--" and point in ("step", "forward", "eval", "test", "save", "fill"), (
        sys.argv
    )
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir=")))
    target, taken, saves = int(step), [steps_already_taken(args, run_dir)], [0]
    size, filled = [0], []

    def after_step(optimizer, *_) -> None:
        taken[0] += 1
        if point == "step" and taken[0] == target:
            die()
        if point == "fill" and saves[0] == 1 and not filled:  # the save is complete by now
            fill(run_dir, size[0] // 2)
            filled.append(True)

    def before_forward(module, *_) -> None:
        if taken[0] < target or not isinstance(module, torch.nn.BatchNorm2d):
            return
        evaluating = not module.training and (point == "eval" or (point == "test" and saves[0]))
        if (point == "forward" and module.training) or evaluating:
            die()

    save = torch.save

    def half_save(obj, f, *a, **kw) -> None:
        if point != "save" or taken[0] < target or not hasattr(f, "write"):
            save(obj, f, *a, **kw)
            saves[0] += taken[0] >= target
            size[0] = f.tell() if hasattr(f, "tell") else size[0]  # DeepSpeed passes paths
            return
        buffer = io.BytesIO()
        save(obj, buffer, *a, **kw)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    register_optimizer_step_post_hook(after_step)
    register_module_forward_pre_hook(before_forward)
    torch.save = half_save
    from dtrain.commands.main import main as dtrain_main

    dtrain_main(["train", *args])


if __name__ == "__main__":
    main()
