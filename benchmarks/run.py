"""Run the benchmarks as one suite: each in its own process (its own table as it goes, its JSON
under benchmarks/results/ with the machine, the command and the date), then one summary table
of the headline numbers against their targets.

    python benchmarks/run.py --suite quick            # < 10 minutes on a 2-core CPU
    python benchmarks/run.py --suite full             # every variant, more repeats
    python benchmarks/run.py --only loader scale_model
    python benchmarks/run.py --render docs/performance.md   # no runs: a docs page with its
                                                            # generated blocks filled, printed

The docs show the results as generated blocks, filled from the JSON under benchmarks/results/
each time the site is built (docs/hooks/generated.py calls benchmarks/performance.py): a new
result file is on the site at the next `mkdocs build`, with nothing to paste or regenerate.

Benchmarks: step_breakdown (where a training step's time goes, per method), loader (streaming
loader vs plain decode, local and `pipe:` shards), mixup_op (the fused mixup op vs torch),
scaling (1 vs 2 processes, full suite), accuracy (method vs baselines, full suite; the complete
study is benchmarks/study.py), growth (prepare to relabel at 10k and 100k images, full suite; 1M
with `benchmarks/growth.py` alone), dedup (near-duplicate recall and false joins on synthetic
films, full suite), prepare (prepare's throughput per engine against decode+encode) and
scale_model (what 1M images x 64 GPUs needs, from the
others' results: it runs last).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS, Column, Table, device_name, slug
from performance import fill

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    script: str
    quick: list[str] | None  # arguments in the quick suite; None: full suite only
    full: list[str]
    result: str  # file name under results/, {device} for the device's slug

    def result_path(self) -> Path:
        return RESULTS / self.result.format(device=slug(device_name()))


BENCHMARKS = {
    "step_breakdown": Benchmark(
        "step_breakdown.py",
        ["--warmup", "2", "--steps", "6", "--profiled", "1"],
        [
            "--variants",
            "eager",
            "compile",
            "channels_last",
            "triton",
            "--steps",
            "20",
            "--repeats",
            "3",
        ],
        "step_breakdown_{device}.json",
    ),
    "loader": Benchmark(
        "loader_throughput.py", ["--repeats", "1"], ["--repeats", "3"], "loader.json"
    ),
    "mixup_op": Benchmark(
        "mixup_bench.py",
        [
            "--batch",
            "1024",
            "4096",
            "--group",
            "8",
            "--dim",
            "512",
            "2048",
            "--repeats",
            "5",
            "--no-compile",
        ],
        ["--repeats", "20"],
        "mixup_{device}.json",
    ),
    "scaling": Benchmark("scaling.py", None, ["--epochs", "3"], "scaling_{device}.json"),
    "accuracy": Benchmark(
        "accuracy_quick.py",
        None,
        ["--methods", "iam", "ce", "--seeds", "0", "1", "--epochs", "12"],
        "accuracy_quick.json",
    ),
    "growth": Benchmark("growth.py", None, ["--sizes", "10000", "100000"], "growth.json"),
    "dedup": Benchmark("dedup_quality.py", None, [], "dedup_quality.json"),
    "prepare": Benchmark("prepare_throughput.py", None, [], "prepare_throughput.json"),
    "scale_model": Benchmark("scale_model.py", [], [], "scale_model.json"),
}


def headline(name: str, result: dict) -> list[tuple[str, float | None, str]]:
    """(what, value, target) rows for the summary table."""
    if name == "step_breakdown":
        rows = result["rows"]
        t = result.get("targets", {})
        out = [(f"{k} img/s", r["images_per_s"], "") for k, r in rows.items()]
        return out + [
            ("method step / CE step", t.get("method_x_ce"), "<= 2.2"),
            ("mixup share of method step", t.get("mixup_share"), "<= 0.05"),
            ("data wait share (worst)", t.get("data_wait_share"), "<= 0.05"),
        ]
    if name == "loader":
        return [
            ("1 worker / plain decode", result["ratio_1_worker"], ">= 0.9"),
            *(
                (f"pipe:cat / file, {w} workers", r, "~1")
                for w, r in result.get("pipe_ratio", {}).items()
            ),
        ]
    if name == "mixup_op":
        best = {}
        for row in result["rows"]:
            key = (row["B"], row["K"], row["D"])
            best.setdefault(key, {})[row["variant"]] = row["GB_s"]
        out = []
        for (b, k, d), variants in best.items():
            if "fused" in variants:
                out.append(
                    (
                        f"fused/torch B={b} K={k} D={d}",
                        variants["fused"] / variants["reference"],
                        ">= 3",
                    )
                )
                if "copy_GB_s" in result:
                    out.append(
                        (
                            f"fused/copy bandwidth B={b} K={k} D={d}",
                            variants["fused"] / result["copy_GB_s"],
                            ">= 0.7",
                        )
                    )
            else:
                out.append((f"torch GB/s B={b} K={k} D={d}", variants["reference"], ""))
        return out
    if name == "scaling":
        rates = result["images_per_s"]
        first, last = min(rates, key=int), max(rates, key=int)
        return [(f"{last} vs {first} processes speed-up", rates[last] / rates[first], "")]
    if name == "accuracy":
        return [
            (f"{m} clean test acc (last)", row["test_last"][0], "")
            for m, row in result["summary"].items()
        ]
    if name == "growth":
        largest = max(result["sizes"])
        last = [r for r in result["ratios"] if r["size"] == largest]
        if not last:  # one size only: nothing to compare
            return [(f"steps at {largest:,} images", len(result["rows"]), "")]
        target = f"<= {result['target_ratio']}"
        return [
            (f"worst per-image time x at {largest:,}", max(r["time_ratio"] for r in last), target),
            (
                f"worst per-image memory x at {largest:,}",
                max(r["memory_ratio"] for r in last),
                target,
            ),
        ]
    if name == "dedup":
        chosen = result["report"]["by_setting"][f"phash256 <= {result['chosen_distance']}"]
        return [
            ("copies found, crops aside", chosen["recall_all_but_cropped"], ">= 0.99"),
            ("distinct patients joined", chosen["false_join_rate"], ""),
        ]
    if name == "prepare":
        rate = {r["what"]: r["images_per_s"] for r in result["runs"]}
        return [
            (
                "prepare x2 vs x1 processes",
                rate["prepare process x2"] / rate["prepare process x1"],
                "",
            ),
            ("Ray x2 vs process x2", rate["prepare ray x2"] / rate["prepare process x2"], ">= 1"),
        ]
    if name == "scale_model":
        rows = [
            (f"workers/GPU at {r['gpu_images_per_s']:.0f} img/s", r["loader_workers_per_gpu"], "")
            for r in result["rows"]
        ]
        return [("all-gather / all-reduce volume", result["gather_vs_allreduce"], ""), *rows]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=("quick", "full"), default="quick")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME")
    parser.add_argument(
        "--render",
        metavar="PAGE",
        help="print this docs page with its generated blocks filled from the results (what the "
        "docs build shows) and stop; runs nothing, writes nothing",
    )
    args = parser.parse_args()
    if args.render:
        page = Path(args.render)
        print(fill(page.read_text(), where=str(page)), end="")
        return
    chosen = args.only or list(BENCHMARKS)
    # in BENCHMARKS' order whatever the order typed: scale_model reads the others' results
    plan = [n for n in BENCHMARKS if n in chosen and getattr(BENCHMARKS[n], args.suite) is not None]
    skipped = sorted(set(chosen) - set(plan))
    if skipped:
        print(f"not in the {args.suite} suite: {', '.join(skipped)}")
    walls = {}
    for name in plan:
        bench = BENCHMARKS[name]
        command = [sys.executable, str(HERE / bench.script), *getattr(bench, args.suite)]
        print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command)
        walls[name] = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"benchmark {name} failed (exit {done.returncode}); see above")
    summary(plan, walls)


def summary(plan: list[str], walls: dict[str, float]) -> None:
    print("\n== summary")
    table = Table(
        Column("benchmark", 14, left=True),
        Column("what", 42, left=True),
        Column("value", 9, ".3g"),
        Column("target", 12, left=True),
        Column("wall s", 7, ".0f"),
    )
    table.header()
    for name in plan:
        result = json.loads(BENCHMARKS[name].result_path().read_text())
        for i, (what, value, target) in enumerate(headline(name, result)):
            table.row(name if i == 0 else "", what, value, target, walls[name] if i == 0 else None)


if __name__ == "__main__":
    main()
