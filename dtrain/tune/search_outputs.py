"""What a search leaves in its folder: every trial and every trial-epoch as Parquet and CSV, the
winner's config as `best.yaml` (which `dtrain train --config` takes unchanged), plots of the
objective against each hyperparameter and of the learning curves (ASHA's stops marked), a JSON
summary and a printed table of the top trials."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from dtrain.config import config_from_dict, save_config, set_key
from dtrain.files import write_atomic, write_json_atomic
from dtrain.tune.settings import Search, epochs_of
from dtrain.tune.trial import OBJECTIVE

TOP = 5
CLEAN = "val_clean_accuracy"


def _trial_rows(search: Search, grid) -> tuple[list[dict], list[dict]]:
    """One row per trial and one per (trial, epoch), from Ray's results and the run folders."""
    trials, epochs = [], []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("_")[2]
        frame = result.metrics_dataframe
        history = []
        if frame is not None and "epoch" in frame:
            frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
            history = frame.to_dict("records")
        done = int(history[-1]["epoch"]) if history else 0
        finished = done >= epochs_of(search.base.train.epochs, result.config)
        status = "failed" if result.error else ("done" if finished else "stopped")
        last = history[-1] if history else {}
        row = {
            "trial_id": trial_id,
            "status": status,
            "epochs": done,
            OBJECTIVE: last.get(OBJECTIVE, math.nan),
            "val_accuracy": last.get("val_accuracy", math.nan),
            CLEAN: last.get(CLEAN, math.nan),
            # the run's own test evaluation (finished trials only), against the clean labels
            "test_clean_accuracy_last": last.get("test_last_clean_accuracy", math.nan),
            "test_clean_accuracy_best": last.get("test_best_clean_accuracy", math.nan),
            "error": str(result.error).splitlines()[0][:200] if result.error else "",
        }
        row.update({d.key: result.config.get(d.key) for d in search.space})
        trials.append(row)
        for record in history:
            keep = {k: v for k, v in record.items() if not k.startswith("config/")}
            epochs.append({"trial_id": trial_id, **keep})
    return trials, epochs


def pick_best(trials: pd.DataFrame, mode: str) -> pd.Series | None:
    """The best objective among trials that ran every epoch (an ASHA-stopped trial never had
    its last epochs to show), else among all that reported."""
    scored = trials[trials[OBJECTIVE].notna() & (trials["status"] != "failed")]
    finished = scored[scored["status"] == "done"]
    pool = finished if len(finished) else scored
    if not len(pool):
        return None
    index = pool[OBJECTIVE].idxmax() if mode == "max" else pool[OBJECTIVE].idxmin()
    return pool.loc[index]


def _write_table(frame: pd.DataFrame, folder: Path, name: str) -> None:
    write_atomic(folder / f"{name}.parquet", lambda f: frame.to_parquet(f, index=False))
    write_atomic(folder / f"{name}.csv", frame.to_csv(index=False))


def _write_best(search: Search, best: pd.Series) -> Path:
    """The winning trial's own saved config, with a fresh run folder: ready for `dtrain train`."""
    import yaml

    saved = Path(search.folder) / "trials" / best["trial_id"] / "config.yaml"
    config = config_from_dict(yaml.safe_load(saved.read_text()))
    set_key(config, "train.run_dir", "")
    set_key(config, "train.progress", True)
    path = Path(search.folder) / "best.yaml"
    save_config(config, path)
    return path


def _plots(search: Search, trials: pd.DataFrame, epochs: pd.DataFrame, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(search.folder)
    dims = search.space
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.4), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        for status, style in (("done", "o"), ("stopped", "x")):
            part = trials[trials["status"] == status]
            ax.scatter(part[dim.key], part[OBJECTIVE], marker=style, label=status)
        if best is not None:
            ax.scatter([best[dim.key]], [best[OBJECTIVE]], marker="*", s=200, c="red", label="best")
        if dim.is_log:
            ax.set_xscale("log")
        elif dim.kind == "choice" and all(isinstance(v, int | float) for v in dim.values):
            ax.set_xticks(list(dim.values))
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"objective (mean {search.settings.metric}, last {search.settings.window})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "objective_vs_params.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for trial_id, part in epochs.groupby("trial_id") if len(epochs) else []:
        status = trials.set_index("trial_id").loc[trial_id, "status"]
        width = 2.5 if best is not None and trial_id == best["trial_id"] else 1
        (line,) = ax.plot(part["epoch"], part[OBJECTIVE], lw=width, alpha=0.8)
        if status == "stopped":  # where ASHA stopped it
            ax.plot(part["epoch"].iloc[-1:], part[OBJECTIVE].iloc[-1:], "x", c=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("objective")
    ax.set_title("trials (x: stopped by the scheduler; thick: best)")
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=110)
    plt.close(fig)


def top_table(trials: pd.DataFrame, search: Search, mode: str) -> str:
    shown = trials[trials["status"] != "failed"].sort_values(OBJECTIVE, ascending=mode == "min")
    columns = ["trial_id", "status", "epochs", OBJECTIVE, CLEAN, "test_clean_accuracy_last"]
    columns += [d.key for d in search.space]
    return shown[columns].head(TOP).to_string(index=False, float_format=lambda v: f"{v:.4g}")


def write_outputs(search: Search, grid) -> dict:
    """Write everything; return the summary (also saved as `summary.json`)."""
    folder = Path(search.folder)
    rows, epoch_rows = _trial_rows(search, grid)
    trials, epochs = pd.DataFrame(rows), pd.DataFrame(epoch_rows)
    _write_table(trials, folder, "trials")
    _write_table(epochs, folder, "epochs")
    best = pick_best(trials, search.settings.mode)
    best_yaml = _write_best(search, best) if best is not None else None
    if best is not None and "mlflow" in search.base.train.trackers:
        from dtrain.train.trackers import tag_best_trial

        tag_best_trial(folder / "trials" / best["trial_id"])
    _plots(search, trials, epochs, best)
    summary = {
        "trials": len(trials),
        "failed": int((trials["status"] == "failed").sum()),
        "stopped_early": int((trials["status"] == "stopped").sum()),
        "trial_epochs": int(trials["epochs"].sum()),
        "best": None if best is None else json.loads(best.to_json()),
        "best_yaml": str(best_yaml) if best_yaml else None,
    }
    write_json_atomic(folder / "summary.json", summary)
    print(f"tune: top trials by {OBJECTIVE} ({search.settings.mode}):")
    print(top_table(trials, search, search.settings.mode))
    print(
        f"tune: {summary['trials']} trials ({summary['stopped_early']} stopped early, "
        f"{summary['failed']} failed), {summary['trial_epochs']} trial-epochs; "
        f"best config {best_yaml}; results in {folder}"
    )
    return summary
