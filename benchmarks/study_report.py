"""The study's tables and plot from its run folders (`benchmarks/study.py`): one Parquet row
per run, mean ± std per (noise, method) in Markdown, a bar plot, and the selection rules
against each other."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from cleanlab_anchor import anchor_table
from cleanlab_anchor import collect as collect_anchor
from study_cells import CEILING, METHODS, TUNING_SEEDS, WARM_VARIANT
from study_run import rule_scores

from dtrain.config import TrainConfig
from dtrain.files import write_atomic
from dtrain.train.report import figure_png
from dtrain.train.selection import RULES

WINDOW = TrainConfig.select_window


def collect(runs: Path) -> list[dict]:
    rows = []
    for path in sorted(runs.glob("*/*/study.json")):
        record = json.loads(path.read_text())
        method, seed = path.parent.name.rsplit("_seed", 1)
        row = {
            "noise": path.parent.parent.name,
            "method": method,
            "seed": int(seed),
            "wall_seconds": record["wall_seconds"],
            "select": record["select"],
            "selected_acc": record["test_best"]["clean_accuracy"],
            "selected_bacc": record["test_best"]["clean_balanced_accuracy"],
            "last_acc": record["test_last"]["clean_accuracy"],
            "last_bacc": record["test_last"]["clean_balanced_accuracy"],
            "ema_last_acc": record["test_ema_last"]["clean_accuracy"],
            "auroc_loss": record["mislabel_auroc"].get("loss"),
            "auroc_attention": record["mislabel_auroc"].get("attention"),
        }
        if record["rounds"]:  # the first round's ranking: the method's own
            first = record["rounds"][0]
            row["auroc_loss"] = first["mislabel_auroc"].get("loss")
            row["auroc_attention"] = first["mislabel_auroc"].get("attention")
            row["label_error_before"] = first["label_error"]
            row["label_error_after"] = record["rounds"][-1]["label_error"]
        history = path.parent / "metrics.jsonl"
        if history.is_file():  # the tuning signal: clean val accuracy of the handed-over model
            last = [line for line in history.read_text().splitlines() if '"kind": "epoch"' in line]
            if last:
                epoch = json.loads(last[-1])
                row["val_clean_acc"] = epoch.get(
                    "val_ema_clean_accuracy", epoch.get("val_clean_accuracy")
                )
        tests = path.parent / "epoch_tests.json"
        if tests.is_file():  # every rule replayed on the run's history (rules added later too)
            history = [
                json.loads(line)
                for line in (path.parent / "metrics.jsonl").read_text().splitlines()
                if '"kind": "epoch"' in line
            ]
            picks = rule_scores(history, json.loads(tests.read_text()), WINDOW)
            for rule, pick in picks.items():
                row[f"rule_{rule}_acc"] = pick["clean_accuracy"]
                row[f"rule_{rule}_epoch"] = pick["epoch"]
        rows.append(row)
    return rows


def mean_std(values: list) -> tuple[float, float, int] | None:
    """None and NaN (a run that could not score it, e.g. no wrong labels to find) are left out."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return (
        statistics.fmean(values),
        statistics.stdev(values) if len(values) > 1 else 0.0,
        len(values),
    )


def fmt(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"  # `seeds` says how many


def method_table(rows: list[dict], noise: str, methods: list[str]) -> tuple[str, dict]:
    """Per method: mean ± std over seeds. The protocol: a default is chosen on the clean val
    accuracy of the tuning seeds (the handed-over model's, from runs whose folders are kept) and
    reported on the clean test accuracy of the other seeds; "vs ceiling" is the selected
    accuracy minus that of CE on the cell's clean labels."""
    lines = [
        f"**{noise}** (clean test labels; mean ± std over seeds)",
        "",
        "| method | seeds | clean val acc, tuning seeds | selected acc "
        "| selected acc, report seeds | vs ceiling "
        "| selected bal. acc | last acc | last bal. acc | EMA last acc "
        "| mislabel AUROC loss | attention |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ceiling = mean_std(
        [r["selected_acc"] for r in rows if r["noise"] == noise and r["method"] == CEILING]
    )
    stats = {}
    for method in methods:
        mine = [r for r in rows if r["noise"] == noise and r["method"] == method]
        if not mine:
            continue
        report = mean_std([r["selected_acc"] for r in mine if r["seed"] not in TUNING_SEEDS])
        tuning = mean_std([r.get("val_clean_acc") for r in mine if r["seed"] in TUNING_SEEDS])
        gap = None if ceiling is None else mean_std([r["selected_acc"] for r in mine])
        gap_text = "–" if gap is None else f"{gap[0] - ceiling[0]:+.3f}"
        cell = {
            key: mean_std([r.get(key) for r in mine])
            for key in (
                "selected_acc",
                "selected_bacc",
                "last_acc",
                "last_bacc",
                "ema_last_acc",
                "auroc_loss",
                "auroc_attention",
            )
        }
        stats[method] = {**cell, "report_seeds_acc": report, "tuning_val_acc": tuning}
        shown = [fmt(tuning), fmt(cell["selected_acc"]), fmt(report), gap_text]
        shown += [fmt(cell[k]) for k in cell if k != "selected_acc"]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(shown) + " |")
    return "\n".join(lines), stats


def seed_spread(groups: list[list[float]]) -> tuple[float, float, int] | None:
    """The mean over methods of each method's mean, and the seed std within a method pooled over
    methods (the root of their mean variance): the methods' own differences are not noise, so
    they must not count as spread. n is the runs; a spread of NaN when no method has 2 seeds."""
    groups = [g for g in groups if g]
    if not groups:
        return None
    seeded = [statistics.variance(g) for g in groups if len(g) > 1]
    spread = math.sqrt(statistics.fmean(seeded)) if seeded else math.nan
    return statistics.fmean(statistics.fmean(g) for g in groups), spread, sum(map(len, groups))


def fmt_spread(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "–"
    mean, spread, _ = stat
    return f"{mean:.3f}" if math.isnan(spread) else f"{mean:.3f} ± {spread:.3f}"


def rule_table(rows: list[dict]) -> tuple[str, dict]:
    """Each rule's clean test accuracy, and that minus the better of last and EMA-last, per noise
    kind, averaged over the methods that scored every rule. The ± is the seed spread within a
    method (pooled), not the spread between methods, which the per-method tables show."""
    scored = [r for r in rows if "rule_last_acc" in r]
    noises = sorted({r["noise"] for r in scored})
    methods = {n: sorted({r["method"] for r in scored if r["noise"] == n}) for n in noises}
    seeds = {n: len({r["seed"] for r in scored if r["noise"] == n}) for n in noises}
    lines = [
        "| rule | "
        + " | ".join(
            f"{n} ({len(methods[n])} methods x {seeds[n]} seed{'s' * (seeds[n] > 1)}): acc "
            f"| {n}: vs best of last/EMA"
            for n in noises
        )
        + " |",
        "|---|" + "---|---|" * len(noises),
    ]
    stats = {}
    for rule in RULES:
        cells = []
        for noise in noises:
            by_method = [
                [r for r in scored if r["noise"] == noise and r["method"] == m]
                for m in methods[noise]
            ]
            acc = seed_spread([[r[f"rule_{rule}_acc"] for r in mine] for mine in by_method])
            gap = seed_spread(
                [
                    [
                        r[f"rule_{rule}_acc"] - max(r["rule_last_acc"], r["rule_ema_last_acc"])
                        for r in mine
                    ]
                    for mine in by_method
                ]
            )
            stats[f"{rule}/{noise}"] = {
                "acc": acc,
                "gap": gap,
                "runs": sum(map(len, by_method)),
                "methods": len(by_method),
                "seeds": seeds[noise],
            }
            cells += [fmt_spread(acc), fmt_spread(gap)]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def rule_method_table(rows: list[dict], noise: str, methods: list[str]) -> str:
    """One noise kind's rules per method: mean ± std over that method's seeds."""
    scored = [r for r in rows if "rule_last_acc" in r and r["noise"] == noise]
    lines = [
        f"**{noise}**, clean test accuracy (mean ± std over seeds)",
        "",
        "| method | seeds | " + " | ".join(RULES) + " |",
        "|---|---|" + "---|" * len(RULES),
    ]
    for method in methods:
        mine = [r for r in scored if r["method"] == method]
        if not mine:
            continue
        cells = [fmt(mean_std([r[f"rule_{rule}_acc"] for r in mine])) for rule in RULES]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise"] for r in rows})
    fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4.5), squeeze=False)
    for ax, noise in zip(axes[0], noises, strict=True):
        names, means, stds = [], [], []
        for method in methods:
            stat = mean_std(
                [r["selected_acc"] for r in rows if r["noise"] == noise and r["method"] == method]
            )
            if stat:
                names.append(method)
                means.append(stat[0])
                stds.append(stat[1])
        ax.barh(names, means, xerr=stds, color="tab:blue")
        ax.set_xlim(0.5, 1.0)
        ax.set_title(f"{noise}: clean test accuracy, selected model")
        ax.invert_yaxis()
    fig.tight_layout()
    write_atomic(path, figure_png(fig, dpi=100))


def write_report(runs: Path, default_rule: str, out: Path) -> dict:
    """Collect the run folders into runs.parquet, then write the tables and the plot."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = collect(runs)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "runs.parquet"
    if recorded.is_file():  # the runs of another machine, or of folders since removed
        here = {(r["noise"], r["method"], r["seed"]) for r in rows}
        rows += [
            r
            for r in rows_from_parquet(recorded)
            if (r["noise"], r["method"], r["seed"]) not in here
        ]
    if not rows:
        return {"runs": 0}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    write_atomic(recorded, sink.getvalue().to_pybytes())
    return write_tables(rows, collect_anchor(runs) or saved_anchor(), default_rule, out)


def saved_anchor() -> list[dict]:
    """The cleanlab anchor's results as benchmarks/results/study.json holds them."""
    from common import RESULTS

    saved = RESULTS / "study.json"
    return (json.loads(saved.read_text()).get("cleanlab") or []) if saved.is_file() else []


def write_tables(rows: list[dict], cleanlab: list[dict], default_rule: str, out: Path) -> dict:
    """study.md and study.png from the runs' rows (and the cleanlab anchor's results)."""

    methods = [*METHODS, *WARM_VARIANT]
    parts = [
        "# dtrain accuracy study",
        "",
        f"Selected model: `train.select={default_rule}`. Made by `python benchmarks/study.py`.",
        "",
    ]
    tables = {}
    for noise in sorted({r["noise"] for r in rows}):
        text, tables[noise] = method_table(rows, noise, methods)
        parts += [text, ""]
    rules_text, rules = rule_table(rows)
    parts += [
        "## Selection rules (methods without rounds)",
        "",
        "Each rule's clean test accuracy, and its gain over the better of `last` and "
        "`ema_last` on the same run, averaged over the methods (each weighs the same). The ± "
        "is the spread between seeds of one method, pooled over the methods; it leaves out "
        "the methods' differences, shown per method below. A noise kind run with one seed has "
        "no seed spread and shows none.",
        "",
        rules_text,
        "",
    ]
    for noise in sorted({r["noise"] for r in rows if "rule_last_acc" in r}):
        if len({r["seed"] for r in rows if r["noise"] == noise}) > 1:
            parts += [rule_method_table(rows, noise, methods), ""]
    if cleanlab:
        parts += ["## cleanlab as the anchor", "", anchor_table(cleanlab, rows), ""]
    write_atomic(out / "study.md", "\n".join(parts))
    plot(rows, methods, out / "study.png")
    return {"runs": len(rows), "tables": tables, "rules": rules, "cleanlab": cleanlab}


def rows_from_parquet(path: Path) -> list[dict]:
    """The rows of a runs.parquet, with the columns a row never had (NaN there) left out."""
    import pandas as pd

    return [
        {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        for row in pd.read_parquet(path).to_dict("records")
    ]


def main() -> None:
    """Rewrite study.md and study.png from runs.parquet (the run folders need not exist), the
    cleanlab anchor's results from benchmarks/results/study.json."""
    import argparse

    from common import RESULTS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS / "study")
    args = parser.parse_args()
    rows = rows_from_parquet(args.out / "runs.parquet")
    (rule,) = {r["select"] for r in rows}
    write_tables(rows, saved_anchor(), rule, args.out)
    print(f"wrote {args.out / 'study.md'} from {len(rows)} runs")


if __name__ == "__main__":
    main()
