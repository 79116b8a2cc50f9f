"""Where a training step's time goes, for CE, the method and each baseline at the same batch,
model and image size: images/s end to end and the share of each phase (data wait, forward,
contrastive incl. the gather, mixup, backward, optimizer), with peak memory.

    python benchmarks/step_breakdown.py [--methods ce iam ...] [--variants eager compile ...]
        [--backbone resnet18] [--image-size 64] [--batch-size 64] [--steps 10] [--repeats 1]

Each (method, variant) runs in its own process (peak memory is per process) through the real
trainer's parts: `Trainer.build()` gives the streaming loader at the default workers, the
Accelerate engine and the optimiser. Phases are timed with a synchronising timer around each
(data wait: blocked on the loader; forward; backward; optimizer step). The contrastive loss and
the mixup live inside the forward and backward: their share comes from a profile of the same
steps (the `dtrain.contrastive` / `dtrain.mixup` ranges in `dtrain.methods.steps`, their backward
found through autograd's sequence numbers), as a fraction of the op time of forward and backward
(CPU time on the CPU, kernel time on a GPU). End-to-end images/s comes from separate steps
without the per-phase synchronisation. Repeats run the configs round-robin (drift hits all
alike); each number is the median over steps and repeats, the spread the interquartile range.

Variants: eager (on a GPU with the fused Triton mixup op, method.mixup_backend=auto); compile
(train.compile: the contrastive and mixup ranges vanish into the compiled graph, so only the
phases around them are split); channels_last (train.channels_last); torch_mixup (the torch
reference mixup, GPU only: on a CPU eager already uses it). The optimizer phase includes the
weight average's update, as in the trainer; the metric sums and score bookkeeping are left out.
Writes benchmarks/results/step_breakdown_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import Column, Table, device_name, preset, slug, write_result
from torch.autograd import DeviceType

PHASES = ("data_wait", "forward", "contrastive", "mixup", "backward", "optimizer")
VARIANTS = {
    "eager": [],  # method.mixup_backend=auto: the fused op on a GPU, torch on a CPU
    "compile": ["train.compile=true"],
    "channels_last": ["train.channels_last=true"],
    "torch_mixup": ["method.mixup_backend=torch"],  # the reference, against eager's fused op
}
BASELINES = ["ce", "mixup", "gce", "sce", "coteaching", "afm", "elr", "dividemix"]
RANGES = {"contrastive": "dtrain.contrastive", "mixup": "dtrain.mixup"}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75); one value gives it three times."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def range_shares(events: list, cuda: bool) -> dict[str, tuple[float, float] | None]:
    """For each of RANGES: (its share of the forward's op time, its share of the backward's);
    None where the profile holds no such range (a compiled step: dynamo drops the ranges).
    On a GPU the larger of the CPU-time and the kernel-time share: a small-kernel part costs
    its launches where the step is launch-bound.

    An op records autograd's sequence number as it was when the op began (whether or not it
    makes a graph node); the nodes made inside a range are those numbered from its first op's
    number up to, not including, the number of the next op in the same forward pass. Their
    backward is the `evaluate_function` event with that number and forward thread."""
    host = [e for e in events if e.device_type == DeviceType.CPU]  # no GPU-side annotations
    shares = _range_shares(host, lambda e: e.cpu_time_total)
    if cuda:
        kernels = _range_shares(host, lambda e: e.device_time_total)
        for phase, pair in shares.items():
            if pair is not None:
                shares[phase] = (max(pair[0], kernels[phase][0]), max(pair[1], kernels[phase][1]))
    return shares


def _range_shares(events: list, cost: Callable) -> dict[str, tuple[float, float] | None]:
    def descendants(event) -> Iterator:
        for child in event.cpu_children:
            yield child
            yield from descendants(child)

    def within(inner, outer) -> bool:
        return (
            inner.thread == outer.thread
            and outer.time_range.start <= inner.time_range.start
            and inner.time_range.end <= outer.time_range.end
        )

    forwards = [e for e in events if e.name == "step.forward"]
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")]
    forward_total = sum(cost(e) for e in forwards)
    backward_total = sum(cost(e) for e in backward)
    shares: dict[str, tuple[float, float] | None] = {}
    for phase, label in RANGES.items():
        fwd = bwd = 0.0
        ranges = [e for e in events if e.name == label]
        if not ranges:
            shares[phase] = None
            continue
        for r in ranges:
            fwd += cost(r)
            inside = [d.sequence_nr for d in descendants(r) if d.sequence_nr >= 0]
            if not inside:
                continue
            after = [
                d.sequence_nr
                for f in forwards
                if within(r, f)
                for d in descendants(f)
                if d.sequence_nr >= 0 and d.time_range.start >= r.time_range.end
            ]
            low, high = min(inside), min(after, default=max(inside) + 1)
            bwd += sum(
                cost(e)
                for e in backward
                if e.fwd_thread == r.thread and low <= e.sequence_nr < high
            )
        shares[phase] = (fwd / max(forward_total, 1e-9), bwd / max(backward_total, 1e-9))
    return shares


class StepRunner:
    """One config's trainer parts, and a training step cut into timed phases."""

    def __init__(self, method: str, overrides: list[str]) -> None:
        from dtrain.config import load_config
        from dtrain.train.resolve import resolve
        from dtrain.train.trainer import Trainer

        config = load_config(preset(method), overrides)
        self.trainer = Trainer(resolve(config))
        self.trainer.build()
        self.engine = self.trainer.engine
        self.cuda = self.engine.device.type == "cuda"
        self.epoch = config.train.epochs - 1  # every part of the method on (warm-up over)
        self.lr = config.optim.lr
        self.batches = self._endless()
        self.steps = 0

    def _endless(self) -> Iterator[dict]:
        loader, epoch = self.trainer.train_loader, 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self, timed: bool) -> dict[str, float]:
        """One step; with `timed`, the seconds of each phase (synchronised at its end)."""
        engine, times, clock = self.engine, {}, time.perf_counter
        mark = clock()

        def lap(phase: str) -> None:
            nonlocal mark
            if timed:
                self.sync()
                now = clock()
                times[phase], mark = now - mark, now

        batch = engine.to_device(next(self.batches))
        memory = self.trainer.memory  # ELR's and DivideMix's rows, as the trainer reads them
        rows = memory.lookup(batch["key"], engine.device) if memory is not None else None
        lap("data_wait")
        with torch.profiler.record_function("step.forward"), engine.autocast():
            out = engine.model(
                batch["view1"], batch["view2"], batch["label"], batch["valid"], self.epoch, rows
            )
        lap("forward")
        engine.backward(out["loss"])
        lap("backward")
        engine.step(self.lr)
        self.steps += 1
        if self.trainer.ema is not None:
            self.trainer.ema.update(self.trainer.net, self.steps)
        lap("optimizer")
        return times

    def images(self) -> int:
        return self.trainer.config.data.batch_size


def measure_one(method: str, overrides: list[str], warmup: int, steps: int, profiled: int) -> dict:
    """This process: warm-up, timed steps, profiled steps, then unsynchronised steps."""
    runner = StepRunner(method, overrides)
    for _ in range(warmup):
        runner.step(timed=False)
    if runner.cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = [runner.step(timed=True) for _ in range(steps)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            runner.step(timed=False)
        runner.sync()
    shares = range_shares(prof.events(), runner.cuda)
    runner.sync()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step(timed=False)
    runner.sync()
    end_to_end = steps * runner.images() / (time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if runner.cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    )
    runner.engine.close()
    # the loader's workers ignore SIGTERM (a SLURM preemption is the main process's to handle),
    # so the interpreter's exit could not stop them: end the endless epoch loop first
    runner.batches.close()
    return {"steps": timed, "shares": shares, "images_per_s": end_to_end, "peak_mib": peak}


def split_phases(steps: list[dict[str, float]], shares: dict) -> list[dict[str, float]]:
    """Each timed step with the contrastive and mixup parts taken out of forward and backward."""
    out = []
    for times in steps:
        row = dict(times)
        for phase, pair in shares.items():
            if pair is None:
                continue
            fwd, bwd = pair
            row[phase] = times["forward"] * fwd + times["backward"] * bwd
            row["forward"] -= times["forward"] * fwd
            row["backward"] -= times["backward"] * bwd
        out.append(row)
    return out


def summarise(runs: list[dict], batch_size: int) -> dict:
    """Median and spread over every timed step of every repeat."""
    rows = [r for run in runs for r in split_phases(run["steps"], run["shares"])]
    totals = [sum(r.values()) for r in rows]
    low, step, high = quartiles(totals)
    phases = {}
    for phase in PHASES:
        values = [r[phase] for r in rows if phase in r]
        if not values:  # not measurable in this config (a compiled step)
            phases[phase] = {"ms": None, "ms_iqr": None, "share": None}
            continue
        p25, median, p75 = quartiles(values)
        phases[phase] = {"ms": median * 1e3, "ms_iqr": (p75 - p25) * 1e3}
    median_sum = sum(p["ms"] for p in phases.values() if p["ms"] is not None)
    for p in phases.values():
        if p["ms"] is not None:
            p["share"] = p["ms"] / median_sum if median_sum else 0.0
    rates = [run["images_per_s"] for run in runs]
    return {
        "step_ms": step * 1e3,
        "step_ms_iqr": (high - low) * 1e3,
        "images_per_s": statistics.median(rates),
        "images_per_s_range": [min(rates), max(rates)],
        "timed_images_per_s": batch_size / step,
        "phases": phases,
        "peak_mib": max(run["peak_mib"] for run in runs),
        "profiled_shares": runs[0]["shares"],
    }


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def configs(methods: list[str], variants: list[str], cuda: bool) -> list[tuple[str, str]]:
    """(method, variant): every method eager; the other variants for CE and the method; the
    torch mixup against the fused op only for the method, only on a GPU (on a CPU eager is it)."""
    out = [(m, "eager") for m in methods]
    for variant in variants:
        if variant == "eager" or (variant == "torch_mixup" and not cuda):
            continue
        wanted = ("iam",) if variant == "torch_mixup" else ("ce", "iam")
        out += [(m, variant) for m in methods if m in wanted]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["ce", "iam", "iam_elr", *BASELINES[1:]])
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--steps", type=positive, default=10, help="timed steps per config and repeat"
    )
    parser.add_argument("--profiled", type=positive, default=2, help="profiled steps per config")
    parser.add_argument("--repeats", type=positive, default=1, help="passes over the configs")
    parser.add_argument("--data", help="a dtrain prepare folder (default: the embedded set)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="result file (default: results/step_breakdown_<device>.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dtrain-breakdown-") as tmp:
        overrides = [
            f"model.backbone={args.backbone}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}",
            "model.pretrained=false",
            "train.progress=false",
            f"train.run_dir={tmp}/run",
            *([f"data.path={args.data}"] if args.data else []),
        ]
        if args.one:  # a child: one config, its numbers as JSON
            method, variant = args.one
            result = measure_one(
                method, overrides + VARIANTS[variant], args.warmup, args.steps, args.profiled
            )
            Path(args.to).write_text(json.dumps(result))
            return
        run_all(args, tmp)


def run_all(args: argparse.Namespace, tmp: str) -> None:
    cuda = torch.cuda.is_available()
    plan = configs(args.methods, args.variants, cuda)
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in plan}
    for repeat in range(args.repeats):
        for method, variant in plan:
            to = Path(tmp) / f"{method}_{variant}_{repeat}.json"
            command = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--one",
                method,
                variant,
                "--to",
                str(to),
            ]
            print(f"  {method} {variant} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{method} {variant} failed:\n{done.stderr[-3000:]}")
            runs[(method, variant)].append(json.loads(to.read_text()))
    rows = {f"{m}/{v}": summarise(r, args.batch_size) for (m, v), r in runs.items()}
    ce = rows.get("ce/eager")
    table = Table(
        Column("method/variant", 20, left=True),
        Column("img/s", 7, ".0f"),
        Column("step ms", 8, ".0f"),
        Column("x CE", 5, ".2f"),
        *(Column(p.replace("_", " "), 11, ".1%") for p in PHASES),
        Column("peak MiB", 9, ".0f"),
    )
    table.header()
    for name, row in rows.items():
        ratio = row["step_ms"] / ce["step_ms"] if ce else None
        row["x_ce_step"] = ratio
        table.row(
            name,
            row["images_per_s"],
            row["step_ms"],
            ratio,
            *(row["phases"][p]["share"] for p in PHASES),
            row["peak_mib"],
        )
    targets = check_targets(rows)
    for line in targets["lines"]:
        print(line)
    result = {
        "device": device_name(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "peak_memory": "CUDA max allocated" if cuda else "peak RSS of the training process",
        "rows": rows,
        "targets": targets["values"],
    }
    name = f"step_breakdown_{slug(device_name())}"
    write_result(name, result, args.out)


def check_targets(rows: dict) -> dict:
    """The issue's targets, from this run's rows: method step <= 2.2x CE, mixup <= 5% of the
    method's step, data wait <= 5% of a step."""
    values, lines = {}, []
    ce, method = rows.get("ce/eager"), rows.get("iam/eager")
    if ce and method:
        values["method_x_ce"] = method["step_ms"] / ce["step_ms"]
        values["mixup_share"] = method["phases"]["mixup"]["share"]
        values["data_wait_share"] = max(r["phases"]["data_wait"]["share"] for r in rows.values())
        for label, key, limit in (
            ("method step / CE step", "method_x_ce", 2.2),
            ("mixup share of the method's step", "mixup_share", 0.05),
            ("data wait share (worst config)", "data_wait_share", 0.05),
        ):
            value = values[key]
            verdict = "met" if value <= limit else "missed"
            lines.append(f"target: {label} <= {limit:g} -> {value:.3g} ({verdict})")
    return {"values": values, "lines": lines}


if __name__ == "__main__":
    main()
