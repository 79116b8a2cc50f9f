"""The docs' generated blocks, from the results under benchmarks/results/: each table says the
machine, the date and the command that made it, so no measured number is ever pasted by hand.

A page holds `<!-- generated: NAME -->` and `<!-- end: NAME -->` with nothing (or anything stale)
between them; `fill` puts the block's current Markdown there. The docs build does it for every
page (`docs/hooks/generated.py`, an mkdocs hook), so the site always shows the results as
committed; `python benchmarks/run.py --render docs/PAGE.md` prints one page as the build sees it.

Blocks (`BLOCKS`): `performance` (the step breakdown, the loader, the mixup op, scaling),
`at-scale` (the scale model), `study-cells`, `study-selection`, `study-cleanlab` (sections of
`study/study.md`, which benchmarks/study_report.py writes), `accuracy-quick`, `tune`,
`review-gain`, `tracker-overhead`, `selection-remeasure`, `growth`, `growth-inverted`,
`dedup-quality`, `dedup-scale`, `prepare-throughput`, `main-job`, `main-job-windows`,
`main-job-windows-rounds`, `main-job-windows-rounds-xeon`, `main-job-windows-crossfit`,
`main-job-windows-tries` (the main job on today's split); and
`figure:PATH`, a PNG under benchmarks/results/ (the hook serves them under the site's
`figures/`)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import RESULTS

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
    # the phases in the order step_breakdown.py wrote them (read here, not imported: importing
    # step_breakdown imports torch, which the docs build has no need of)
    first = next(iter(result["rows"].values()), {})
    phases = list(first.get("phases", {}))
    rows = []
    for name, row in result["rows"].items():
        x_ce = row.get("x_ce_step")
        rows.append(
            [
                f"`{name}`",
                f"{row['images_per_s']:.0f}",
                f"{row['step_ms']:.0f} ± {row['step_ms_iqr'] / 2:.0f}",
                "—" if x_ce is None else f"{x_ce:.2f}",
                *(_pct(row["phases"][p]["share"]) for p in phases),
                f"{row['peak_mib']:.0f}",
            ]
        )
    header = ["method/variant", "img/s", "step ms", "× CE", *phases, "peak MiB"]
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


def _mean_std(stat: list[float] | None) -> str:
    """`[mean, std]` as the accuracy scripts store it."""
    return "—" if not stat else f"{stat[0]:.3f} ± {stat[1]:.3f}"


def accuracy_quick_md() -> list[str]:
    results = _load("accuracy_quick.json")
    if not results:
        return ["No results yet: `python benchmarks/run.py --suite full --only accuracy`."]
    r = results[0]
    head = (
        f"**Method vs baselines** ({len(r['seeds'])} seeds, {r['epochs']} epochs, "
        f"{r['image_size']} px; mean ± std over the seeds of the clean test accuracy; "
        f"{_where(r)})."
    )
    rows = [
        [
            f"`{method}` (`{r['presets'].get(method, '')}`)",
            _mean_std(row["test_last"]),
            _mean_std(row["test_best"]),
            " / ".join(
                _mean_std(row[k]) for k in ("mislabel_auroc_attention", "mislabel_auroc_loss")
            ),
        ]
        for method, row in r["summary"].items()
    ]
    header = [
        "method",
        "test acc, last checkpoint",
        "test acc, best noisy-val checkpoint",
        "wrong-label AUROC: attention / loss",
    ]
    return [head, "", *_table(header, rows), ""]


TUNE_SEARCHES = {
    "full": "every config to the end (`--scheduler none`)",
    "asha": "ASHA (the search file's grace period and reduction factor)",
}


def tune_md() -> list[str]:
    results = _load("tune.json")
    if not results:
        return ["No results yet: `python benchmarks/tune_asha.py`."]
    r = results[0]
    head = (
        f"**ASHA against running every config to the end** ({r['samples']} configs of "
        f"`{r['search_file']}`, {r['epochs']} epochs at {r['image_size']} px, "
        f"{r['max_concurrent']} trials at once; {_where(r)})."
    )
    full_epochs = r["searches"].get("full", {}).get("trial_epochs")
    rows = []
    for name, search in r["searches"].items():
        epochs = str(search["trial_epochs"])
        if full_epochs and name != "full":
            epochs += f" ({search['trial_epochs'] / full_epochs:.0%})"
        config = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in search["best_config"].items()
        )
        wall = search.get("wall_seconds")
        rows.append(
            [
                TUNE_SEARCHES.get(name, name),
                f"{search['best_objective']:.3f}",
                f"{search['pick_clean_test_accuracy']:.3f}",
                epochs,
                str(search["stopped_early"]),
                "—" if wall is None else f"{wall:.0f}",
                f"`{config}`",
            ]
        )
    header = [
        "search",
        "best objective",
        "clean test acc of its pick",
        "trial-epochs",
        "stopped early",
        "wall s",
        "its pick",
    ]
    targets = r.get("targets_met", {})
    tail = (
        f"Best of the {r['samples']} by clean test accuracy (the oracle, unknown to a user): "
        f"{r['oracle_clean_test_accuracy']:.3f}. Full pick minus ASHA pick: "
        f"{r['gap_points']:.1f} points (target ≤ 1: "
        f"{'met' if targets.get('within_1_point') else 'missed'}); ASHA used "
        f"{r['asha_epoch_share']:.0%} of the trial-epochs (target ≤ 50%: "
        f"{'met' if targets.get('half_the_epochs') else 'missed'}). Spearman correlation of the "
        f"objective with clean val accuracy {r['spearman_objective_vs_clean_val']:.2f}, with "
        f"clean test accuracy {r['spearman_objective_vs_clean_test']:.2f}."
    )
    return [head, "", *_table(header, rows), "", tail, ""]


def review_gain_md() -> list[str]:
    results = _load("review_gain.json")
    if not results:
        return ["No results yet: `python benchmarks/review_gain.py --before RUN`."]
    r = results[0]
    before, after = r["clean_test_accuracy"]["before"], r["clean_test_accuracy"]["after"]
    noise = r["train_noise_rate"]
    head = (
        f"**What a review buys** (top {r['fraction']:.0%} of train reviewed, the clean labels "
        f"standing in for the clinician; {r['wall_seconds'] / 60:.0f} minutes; {_where(r)})."
    )
    rows = [
        [
            "labels looked at / fixed",
            "",
            f"{r['labels_looked_at']} / {r['labels_fixed']}: "
            f"{r['fixed_per_100_looked_at']:.0f} per 100 looked at (a random pick fixes "
            f"{r['fixed_per_100_random_pick']:.0f})",
        ],
        ["train label noise", f"{noise['before']:.3f}", f"{noise['after']:.3f}"],
        [
            "clean test accuracy, last checkpoint",
            f"{before['last']:.3f}",
            f"{after['last']:.3f}",
        ],
        [
            "clean test accuracy, `best.pt` (picked on the noisy val labels)",
            f"{before['best']:.3f}",
            f"{after['best']:.3f}",
        ],
    ]
    return [head, "", *_table(["", "before", "after the review"], rows), ""]


def tracker_overhead_md() -> list[str]:
    results = _load("tracker_overhead_*.json")
    if not results:
        return ["Not measured yet: `python benchmarks/tracker_overhead.py`."]
    lines = []
    for r in results:
        s = r.get("settings", {})
        lines += [
            f"**Tracker overhead** ({s.get('backbone', '?')}, {s.get('image_size', '?')} px, "
            f"{s.get('epochs', '?')} epochs, {s.get('repeats', '?')} repeats; medians over "
            f"the repeats, ratios to `[tensorboard]` measured in the same run; {_where(r)}).",
            "",
        ]
        rows = [
            [
                f"`{variant}`",
                f"{v['step_mean_s'] * 1e3:.0f}",
                f"{v['step_median_s'] * 1e3:.0f}",
                f"{v['run_s']:.0f}",
                f"{v['step_mean_s_ratio']:.3f}",
                f"{v['step_median_s_ratio']:.3f}",
                f"{v['run_s_ratio']:.3f}",
            ]
            for variant, v in r["summary"].items()
        ]
        header = [
            "trackers",
            "step mean ms",
            "step median ms",
            "run s",
            "step mean ×",
            "step median ×",
            "run ×",
        ]
        lines += [*_table(header, rows), ""]
    return lines


def tune_objectives_md() -> list[str]:
    results = _load("tune_objectives.json")
    if not results:
        return ["Not run yet: `python benchmarks/tune_objectives.py`."]
    r = results[0]
    tuning = r.get("tuning_search", {}).get("spearman", {})
    report = r.get("report_search", {}).get("spearman", {})
    chosen, today = r.get("chosen"), r.get("default_before")

    def cell(values: dict, name: str) -> str:
        value = values.get(name)
        return "not run yet" if value is None else f"{value:.3f}"

    names = sorted(tuning, key=lambda k: -tuning[k] if tuning[k] == tuning[k] else 2.0)
    rows = [
        [
            f"`{name}`"
            + (" (chosen)" if name == chosen else "")
            + (" (before)" if name == today else ""),
            cell(tuning, name),
            cell(report, name),
        ]
        for name in names
    ]
    head = (
        f"**Label-free search objectives** against the clean test accuracy of each trial's "
        f"handed-over model (`{r.get('target')}`), Spearman over the trials of a full search; "
        f"chosen on the tuning search (sampler seed 0, train.seed 0), reported on the report "
        f"search (seed 1); {_where(r)}."
    )
    header = ["objective (metric@window)", "tuning search", "report search"]
    return [head, "", *_table(header, rows), ""]


def selection_remeasure_md() -> list[str]:
    results = _load("selection_remeasure.json")
    if not results:
        return ["Not run yet: `python benchmarks/selection_remeasure.py`."]
    r = results[0]
    rows = [
        [
            row["noise"],
            row["method"],
            row["rule"],
            " ".join(str(s) for s in row.get("seeds", [])),
            "—" if row["study"] is None else f"{row['study']:.3f}",
            "—" if row["new"] is None else f"{row['new']:.3f}",
        ]
        for row in r["rows"]
    ]
    head = f"**Selection rules re-measured** (mean clean test accuracy; {_where(r)})."
    header = ["noise", "method", "rule", "seeds", "study", "now"]
    return [head, "", *_table(header, rows), ""]


def growth_md(file: str = "growth.json") -> list[str]:
    """A growth.py result: the default sizes, or one written with --out."""
    results = _load(file)
    if not results:
        return [f"Not run yet: `python benchmarks/growth.py` (writes {file})."]
    r = results[0]
    smallest = min(r["sizes"])
    against = {(x["size"], x["step"]): x for x in r["ratios"]}
    rows = []
    for row in r["rows"]:
        ratio = against.get((row["size"], row["step"]))
        rows.append(
            [
                f"{row['size']:,}",
                row["step"],
                f"{row['seconds']:.1f}",
                f"{row['us_per_image']:.1f}",
                f"{row['peak_rss_mb']:.0f}",
                f"{row['kb_per_image']:.2f}",
                "—" if ratio is None else f"{ratio['time_ratio']:.2f}",
                "—" if ratio is None else f"{ratio['memory_ratio']:.2f}",
                "—" if ratio is None else f"{ratio['marginal_us_per_image']:.1f}",
            ]
        )
    head = (
        f"**Growth with the dataset** (synthetic {r['settings']['side']} px films; each step in "
        f"its own process, peak RSS its largest process; × against {smallest:,} images per "
        f"image, + the marginal µs of each image added since the size before; {_where(r)})."
    )
    header = ["images", "step", "s", "µs/image", "peak MB", "KB/image", "time ×", "memory ×"]
    return [head, "", *_table([*header, "+µs/image"], rows), ""]


def main_job_md(file: str = "main_job.json") -> list[str]:
    """A main_job.py result: the default grid, or one written with --out."""
    results = _load(file)
    if not results:
        return [f"Not run yet: `python benchmarks/main_job.py` (writes {file})."]
    r = results[0]
    tuning, report = r["tuning_seeds"], r["report_seeds"]

    def acc(runs: dict, seed: int, key: str) -> str:
        run = runs.get(str(seed))
        return "—" if run is None or run[key] is None else f"{run[key]:.3f}"

    def number(value: float | None, scale: float = 1.0, fmt: str = ".3f") -> str:
        return "—" if value is None else f"{value / scale:{fmt}}"

    rows = []
    for name, result in r["results"].items():
        s = result["summary"]
        rows.append(
            [
                f"**{name}**" if name == r["chosen"] else name,
                r["candidates"][name],
                f"`{' '.join(r['overrides'][name])}`",
                *(acc(result["tuning"], seed, "val_clean_accuracy") for seed in tuning),
                number(s["val_clean_mean"]),
                *(acc(result.get("report", {}), seed, "test_clean_accuracy") for seed in report),
                number(s["test_clean_mean"]),
                number(s["mislabel_auroc_loss_mean"]),
                number(s["wall_s_mean_of_timed"], 60, ".1f"),
            ]
        )
    head = (
        f"**The main job's candidates** ({r['protocol']}; clean accuracy of the handed-over "
        f"model; the chosen one in bold; wrong-label AUROC of the per-sample loss; minutes per "
        f"run where timed; {_where(r)})."
    )
    header = [
        "candidate",
        "what",
        "`dtrain train` with",
        *(f"val, seed {seed}" for seed in tuning),
        "val mean",
        *(f"test, seed {seed}" for seed in report),
        "test mean",
        "AUROC",
        "min",
    ]
    return [head, "", *_table(header, rows), ""]


def dedup_quality_md() -> list[str]:
    results = _load("dedup_quality.json")
    if not results:
        return ["Not run yet: `python benchmarks/dedup_quality.py`."]
    r = results[0]
    rows = []
    for part in ("tune", "report"):
        for name, m in r[part]["by_setting"].items():
            rows.append(
                [
                    part,
                    f"{r[part]['n']:,}",
                    name,
                    m.get("search", "—"),
                    "—" if m.get("seconds") is None else f"{m['seconds']:.1f}",
                    f"{m['recall_all']:.3f}",
                    f"{m['recall_all_but_cropped']:.3f}",
                    f"{m['recall'].get('cropped', float('nan')):.3f}",
                    f"{m['false_join_rate']:.2%}",
                    str(m["largest_group_patients"]),
                    _pct(m["copies_across_splits"]),
                    "/".join(f"{v:.3f}" for v in m["split"].values()),
                ]
            )
    crops = ", ".join(
        f"≤ {k.removeprefix('up_to_')}: {v:.2f}" for k, v in r["crop_recall_at_chosen"].items()
    )
    head = (
        f"**Near-duplicates at scale** (synthetic chest films, each original its own patient, "
        f"10 % planted copies under new patient ids; distance chosen on the tuning set: "
        f"{r['chosen_distance']} bits; {_where(r)})."
    )
    header = [
        "set",
        "images",
        "grouping",
        "search",
        "s",
        "recall",
        "recall (no crops)",
        "recall crop 3–8 %",
        "patients joined",
        "largest group",
        "copies across splits",
        "train/val/test",
    ]
    tail = (
        f"Cropped copies found at {r['chosen_distance']} bits, by the most cut per side: {crops}."
    )
    return [head, "", *_table(header, rows), "", tail, ""]


def prepare_throughput_md() -> list[str]:
    results = _load("prepare_throughput.json")
    if not results:
        return ["Not run yet: `python benchmarks/prepare_throughput.py`."]
    r = results[0]
    floor = r["floor_decode_encode_per_s"]
    rows = [
        [
            x["what"],
            str(x["cores"]),
            f"{x['seconds']:.1f}",
            f"{x['images_per_s']:.0f}",
            f"{x['images_per_s'] / x['cores'] / floor:.2f}",
            {None: "—", True: "yes", False: "**no**"}[x["same"]],
        ]
        for x in r["runs"]
    ]
    head = (
        f"**prepare's throughput** ({r['images']:,} synthetic {r['side']} px films; per core "
        f"against one process's PIL decode + JPEG encode, {floor:.0f} images/s; {_where(r)})."
    )
    header = ["what", "cores", "s", "images/s", "per core vs floor", "same bytes as x1"]
    return [head, "", *_table(header, rows), ""]


STUDY_MD = RESULTS / "study" / "study.md"
# the blocks showing study.md: "" is its part before the first `## ` heading (one table per
# noise kind), the others a section by the start of its heading
STUDY_SECTIONS = {
    "study-cells": "",
    "study-selection": "Selection rules",
    "study-cleanlab": "cleanlab",
}


def study_sections(path: Path = STUDY_MD) -> dict[str, list[str]]:
    """A study.md split at its `## ` headings (its `# ` title dropped), by heading."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def study_md(block: str) -> list[str]:
    """One section of study.md; a section that no block shows is an error, so that nothing the
    study reports is left off the docs."""
    if not STUDY_MD.is_file():
        return ["No study yet: `python benchmarks/study.py`."]
    sections = study_sections()
    prefixes = STUDY_SECTIONS.values()
    unshown = [h for h in sections if not any(h.startswith(p) for p in prefixes if p) and h]
    if unshown:
        raise ValueError(
            f"{STUDY_MD} has sections no docs block shows: {unshown}; add them to "
            "STUDY_SECTIONS in benchmarks/performance.py and a block to docs/results.md"
        )
    prefix = STUDY_SECTIONS[block]
    for heading, lines in sections.items():
        if heading.startswith(prefix) and (prefix or not heading):
            return [*lines, ""]
    return [f"No '{prefix}' section in {STUDY_MD} yet: `python benchmarks/study.py`."]


STUDY_40_MD = RESULTS / "study_40epochs" / "study.md"


def study_40epochs_md() -> list[str]:
    """The per-cell tables of the study at the main job's 40 epochs (some methods only)."""
    if not STUDY_40_MD.is_file():
        return ["Not run yet: `python benchmarks/study.py --epochs 40 --out ...` (docstring)."]
    return [*study_sections(STUDY_40_MD)[""], ""]


def dedup_scale_md() -> list[str]:
    results = _load("dedup_scale.json")
    if not results:
        return ["Not run yet: `python benchmarks/dedup_scale.py`."]
    r = results[0]
    rows = []

    def row(part: str, n: int, search: str, distance: int, m: dict, moved: int | None) -> None:
        rows.append(
            [
                part,
                f"{n:,}",
                search,
                str(distance),
                f"{m['seconds']:.1f}",
                # results from before the windows measured copies other than crops only
                f"{m['recall_all']:.4f}" if "recall_all" in m else "—",
                f"{m['recall_cropped']:.3f}" if "recall_cropped" in m else "—",
                f"{m['false_join_rate']:.3%}",
                str(m["largest_group_patients"]),
                "—" if moved is None else f"{moved:,}",
            ]
        )

    for distance, m in r["tune"]["by_distance"].items():
        row("tune", r["tune"]["n"], "inverted", int(distance), m, None)
    for m in r["report"]["by_setting"].values():
        row("report", r["report"]["n"], m["search"], m["distance"], m, m["regrouped"])
    head = (
        f"**The distance and the search beyond 30k images** (the same films; the tuning set's "
        f"distance at {r['tune']['n']:,} images: {r['chosen_distance_at_tune_n']} bits, a slope "
        f"of {r['bits_per_decade_measured']:.2f} bits per tenfold; the rule's distance at "
        f"{r['report']['n']:,}: {r['report']['rule_distance']} bits; search seconds on "
        f"{r['workers']} worker processes; {_where(r)})."
    )
    header = [
        "set",
        "images",
        "search",
        "bits",
        "search s",
        "recall",
        "recall of crops",
        "patients joined",
        "largest group",
        "images grouped otherwise than by the exact search",
    ]
    return [head, "", *_table(header, rows), ""]


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "performance": performance_md,
    "at-scale": at_scale_md,
    **{name: (lambda n=name: study_md(n)) for name in STUDY_SECTIONS},
    "accuracy-quick": accuracy_quick_md,
    "tune": tune_md,
    "review-gain": review_gain_md,
    "tracker-overhead": tracker_overhead_md,
    "selection-remeasure": selection_remeasure_md,
    "tune-objectives": tune_objectives_md,
    "study-40epochs": study_40epochs_md,
    "growth": growth_md,
    "growth-inverted": partial(growth_md, "growth_inverted.json"),
    "dedup-quality": dedup_quality_md,
    "dedup-scale": dedup_scale_md,
    "prepare-throughput": prepare_throughput_md,
    "main-job": main_job_md,
    "main-job-windows": partial(main_job_md, "main_job_windows.json"),
    "main-job-windows-rounds": partial(main_job_md, "main_job_windows_rounds.json"),
    "main-job-windows-rounds-xeon": partial(main_job_md, "main_job_windows_rounds_xeon.json"),
    "main-job-windows-crossfit": partial(main_job_md, "main_job_windows_crossfit.json"),
    "main-job-windows-tries": partial(main_job_md, "main_job_windows_tries.json"),
}
FIGURE = "figure:"  # `figure:study/study.png`: a PNG under RESULTS
# a marker is a line of its own (one quoted inside a sentence or a code span is text)
MARKER = re.compile(
    r"^<!-- generated: (?P<name>\S+) -->\n(?P<body>.*?)^<!-- end: (?P=name) -->$",
    re.DOTALL | re.MULTILINE,
)
OPENING = re.compile(r"^<!-- generated: (\S+) -->$", re.MULTILINE)


def figure_md(path: str, url: Callable[[str], str] | None = None) -> list[str]:
    """A results figure, or a line saying it is not there yet. `url` maps its path under RESULTS
    to a link (the docs hook serves the PNGs itself); default: a path from the repository root."""
    if not (RESULTS / path).is_file():
        return [f"No figure yet: `benchmarks/results/{path}`."]
    link = url(path) if url else f"benchmarks/results/{path}"
    return [f"![{Path(path).stem}]({link})", ""]


def render(name: str, figure_url: Callable[[str], str] | None = None) -> list[str]:
    """The Markdown of one block."""
    if name.startswith(FIGURE):
        return figure_md(name[len(FIGURE) :], figure_url)
    if name not in BLOCKS:
        raise ValueError(
            f"no generated block {name!r}; known: {', '.join(BLOCKS)}, or {FIGURE}PATH"
        )
    return BLOCKS[name]()


def fill(text: str, figure_url: Callable[[str], str] | None = None, where: str = "") -> str:
    """`text` with the body of every generated block replaced by its current Markdown. An
    unknown block, or one that is opened and never closed, is an error naming it."""
    closed = {m.group("name") for m in MARKER.finditer(text)}
    unclosed = [n for n in OPENING.findall(text) if n not in closed]
    if unclosed:
        raise ValueError(
            f"{where or 'the text'}: '<!-- generated: {unclosed[0]} -->' has no "
            f"'<!-- end: {unclosed[0]} -->'"
        )

    def body(match: re.Match) -> str:
        name = match.group("name")
        try:
            lines = render(name, figure_url)
        except ValueError as err:
            raise ValueError(f"{where or 'the text'}: {err}") from None
        return f"<!-- generated: {name} -->\n" + "\n".join(lines) + f"\n<!-- end: {name} -->"

    return MARKER.sub(body, text)


def update_readme(path: Path) -> None:
    """Fill a Markdown file's generated blocks in place: a copy of a page to read outside the
    docs build. A file without a block is refused. (The README itself holds none any more;
    tests/benchmarks/test_benchmarks.py still calls this by its old name.)"""
    text = path.read_text()
    if not MARKER.search(text):
        raise SystemExit(
            f"{path} has no generated blocks ('<!-- generated: performance -->' ... "
            f"'<!-- end: performance -->', or another of: {', '.join(BLOCKS)})"
        )
    write_atomic(path, fill(text, where=str(path)))
    print(f"updated {path}")
