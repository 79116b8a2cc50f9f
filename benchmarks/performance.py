"""The README's generated sections, from the JSON under benchmarks/results/: "Performance" (the
step breakdown, the loader, the mixup op, scaling) and "At scale" (the scale model). Each table
says the machine, the date and the command that made it.

Between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in the README; everything else in
it is left as it is. `python benchmarks/run.py --readme README.md` calls `update_readme`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from common import RESULTS
from step_breakdown import PHASES

from dtrain.files import write_atomic


def _load(pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]


def _where(result: dict) -> str:
    """Machine, torch, date and command, as far as the result file says (older files say less)."""
    m = result.get("machine", {})
    if m.get("gpus"):
        device = ", ".join(m["gpus"])
    else:
        device = f"{m.get('cpu', result.get('device', 'unknown CPU'))}, {m.get('cores', '?')} cores"
    date = result.get("date", "undated")[:10]
    command = result.get("command")
    return f"{device}; torch {m.get('torch', '?')}; {date}" + (f"; `{command}`" if command else "")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def step_breakdown_md(result: dict) -> list[str]:
    head = (
        f"**Training step** ({result['backbone']}, {result['image_size']} px, batch "
        f"{result['batch_size']}, one process; {_where(result)}). Phase shares of the median "
        f"step; peak memory is the {result['peak_memory']}."
    )
    rows = []
    for name, row in result["rows"].items():
        x_ce = row.get("x_ce_step")
        rows.append(
            [
                f"`{name}`",
                f"{row['images_per_s']:.0f}",
                f"{row['step_ms']:.0f} ± {row['step_ms_iqr'] / 2:.0f}",
                "—" if x_ce is None else f"{x_ce:.2f}",
                *(_pct(row["phases"][p]["share"]) for p in PHASES),
                f"{row['peak_mib']:.0f}",
            ]
        )
    header = ["method/variant", "img/s", "step ms", "× CE", *PHASES, "peak MiB"]
    lines = [head, "", *_table([h.replace("_", " ") for h in header], rows), ""]
    targets = result.get("targets", {})
    if targets:
        lines.append(
            f"Targets: method step {targets['method_x_ce']:.2f}× CE (≤ 2.2); mixup "
            f"{targets['mixup_share']:.1%} of the method's step (≤ 5%); data wait at most "
            f"{targets['data_wait_share']:.1%} of a step (≤ 5%)."
        )
        lines.append("")
    return lines


def loader_md(result: dict) -> list[str]:
    rows = [
        [name, f"{rate:.0f}", f"{rate / result['plain_baseline']:.2f}"]
        for name, rate in result["images_per_s"].items()
    ]
    head = (
        f"**Loader** ({result['size']} px, two augmented views, {result['images']} train images, "
        f"best of {result['repeats']}; {_where(result)})."
    )
    return [head, "", *_table(["pipeline", "images/s", "× plain"], rows), ""]


def mixup_md(result: dict) -> list[str]:
    rows = [
        [str(r["B"]), str(r["K"]), str(r["D"]), r["variant"], f"{r['ms']:.3f}", f"{r['GB_s']:.1f}"]
        for r in result["rows"]
    ]
    head = f"**Mixup op** (bf16, effective bandwidth; {_where(result)})."
    if "copy_GB_s" in result:
        head += f" Device copy bandwidth {result['copy_GB_s']:.0f} GB/s."
    else:
        head += " No GPU: the fused kernel is not timed (Triton's interpreter checks, not times)."
    return [head, "", *_table(["B", "K", "D", "variant", "ms", "GB/s"], rows), ""]


def scaling_md(result: dict) -> list[str]:
    rates = result["images_per_s"]
    base = rates[min(rates, key=int)]
    rows = [[p, f"{r:.1f}", f"{r / base:.2f}"] for p, r in rates.items()]
    head = (
        f"**Processes** (`{result['method']}`, {result['image_size']} px, batch "
        f"{result['batch_size_per_rank']} per rank; {_where(result)})."
    )
    return [head, "", *_table(["processes", "images/s", "speed-up"], rows), ""]


def performance_md() -> list[str]:
    lines = []
    for pattern, render in (
        ("step_breakdown_*.json", step_breakdown_md),
        ("loader.json", loader_md),
        ("mixup_*.json", mixup_md),
        ("scaling_*.json", scaling_md),
    ):
        for result in _load(pattern):
            lines += render(result)
    return lines or ["No results yet: `python benchmarks/run.py --suite quick`."]


def at_scale_md() -> list[str]:
    results = _load("scale_model.json")
    if not results:
        return ["No scale model yet: `python benchmarks/run.py --only scale_model`."]
    r = results[0]
    lines = [
        f"{r['images']:,} images ({r['bytes_per_sample'] / 1e3:.0f} kB a sample as `dtrain "
        f"prepare` stores Br35H: {r['dataset_GB']:.0f} GB) on {r['gpus']} GPUs "
        f"({r['nodes']} nodes of {r['gpus_per_node']}), {r['backbone']} at {r['image_size']} px, "
        f"batch {r['batch_per_gpu']} per GPU. The loader decodes "
        f"{r['loader_images_per_s_per_worker']:.0f} images/s per worker ({r['loader_source']}). "
        f"`{r['command']}`, {r['date'][:10]}.",
        "",
    ]
    rows = [
        [
            f"{row['gpu_images_per_s']:.0f} ({row['gpu_rate_source']})",
            str(row["loader_workers_per_gpu"]),
            f"{row['node_read_MB_s']:.0f}",
            f"{row['shards']} × {row['shard_MB']:.0f} MB",
            f"{row['step_ms']:.1f}",
            f"{row['data_bound_below_step_ms']:.1f}",
        ]
        for row in r["rows"]
    ]
    header = [
        "GPU images/s",
        "loader workers / GPU",
        "read MB/s per node",
        "shards",
        "step ms",
        "data-bound below (ms/step)",
    ]
    lines += _table(header, rows)
    lines += [
        "",
        f"Per step, each GPU's contrastive all-gather (global negatives, forward and backward) "
        f"moves {r['gather_MB_per_step']:.2f} MB against {r['allreduce_MB_per_step']:.0f} MB "
        f"for the gradient all-reduce of {r['parameters'] / 1e6:.1f} M parameters "
        f"({r['gather_vs_allreduce']:.1%}): the global negatives cost little next to data "
        f"parallelism itself.",
    ]
    return lines


SECTIONS = {"performance": performance_md, "at-scale": at_scale_md}


def update_readme(path: Path) -> None:
    """Replace each generated section's body; a README without the markers is an error."""
    text = path.read_text()
    for name, render in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            raise SystemExit(
                f"{path} has no '<!-- generated: {name} -->' ... '<!-- end: {name} -->' "
                "markers; add them where the section belongs"
            )
        body = "\n".join(render()) + "\n"
        text = pattern.sub(lambda m, b=body: m.group(1) + b + m.group(2), text)
    write_atomic(path, text)
    print(f"updated {path}: {', '.join(SECTIONS)}")
