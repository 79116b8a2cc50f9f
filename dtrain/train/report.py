"""What a run leaves for a person: progress bars, one line per epoch, the mislabel ranking
(`label_scores.parquet`), train/val curves (`curves.png`) and a summary table
(`summary.json`, printed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dtrain.train.checkpoint import write_text_atomic
from dtrain.train.metrics import auroc

SUSPECTS_SHOWN = 10


def progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="batch",
        disable=not enabled,
        initial=initial,
        leave=False,
        dynamic_ncols=True,
    )


def epoch_line(record: dict) -> str:
    return (
        f"epoch {record['epoch']:3d}  loss {record['train_loss']:.3f}  "
        f"train acc {record['train_accuracy']:.3f}  val acc {record['val_accuracy']:.3f} "
        f"(clean {record['val_clean_accuracy']:.3f})  {record['images_per_s']:.0f} img/s"
    )


def label_scores(scores: dict, manifest: Path) -> tuple[list[dict], dict[str, float]]:
    """Rows ranked most suspicious first, and the AUROC of each score for finding the labels
    that were made wrong on purpose (known from the clean label kept beside each sample)."""
    import pyarrow.parquet as pq

    sources = {}
    if manifest.is_file():
        table = pq.read_table(manifest, columns=["key", "source"]).to_pydict()
        sources = dict(zip(table["key"], table["source"], strict=True))
    rows = []
    for key, (att_sum, loss_sum, count, is_noisy, label, predicted) in scores.items():
        attention = att_sum / count
        rows.append(
            {
                "key": key,
                "source": sources.get(key, ""),
                "noisy_label": label,
                "predicted_label": predicted,
                "attention_score": attention,
                "loss_score": loss_sum / count,
                "is_noisy": bool(is_noisy),
            }
        )
    has_attention = rows and not math.isnan(rows[0]["attention_score"])
    for row in rows:  # suspicion: high means "this label looks wrong"
        row["score"] = 1 - row["attention_score"] if has_attention else row["loss_score"]
    rows.sort(key=lambda r: -r["score"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    truth = np.array([r["is_noisy"] for r in rows])
    aurocs = {"loss": auroc(np.array([r["loss_score"] for r in rows]), truth)}
    if has_attention:
        aurocs["attention"] = auroc(np.array([1 - r["attention_score"] for r in rows]), truth)
    return rows, aurocs


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    left.set_xlabel("epoch")
    left.set_title("training loss")
    left.legend()
    right.plot(epochs, [r["train_accuracy"] for r in history], label="train (noisy labels)")
    right.plot(epochs, [r["val_accuracy"] for r in history], label="val (labels as shipped)")
    right.plot(epochs, [r["val_clean_accuracy"] for r in history], label="val (clean labels)")
    right.set_xlabel("epoch")
    right.set_title("accuracy")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(summary: dict) -> str:
    names = ["accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"]
    lines = [f"{'test (clean labels)':22s}" + "".join(f"{n:>19s}" for n in names)]
    for which in ("best", "last"):
        metrics = summary[f"test_{which}"]
        if metrics is None:
            continue
        lines.append(
            f"{which + ' checkpoint':22s}"
            + "".join(f"{metrics['clean_' + n]:19.4f}" for n in names)
        )
    return "\n".join(lines)


def write_run_report(
    run_dir: Path,
    config,
    history: list[dict],
    scores: dict,
    *,
    test_best: dict,
    test_last: dict,
    manifest: Path,
    classes: list[str],
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    summary = {
        "method": config.method.name,
        "epochs": len(history),
        "test_best": test_best,
        "test_last": test_last,
        "best_epoch": None,
        "mislabel_auroc": {},
    }
    if history:
        best = max(history, key=lambda r: r["val_accuracy"])
        summary["best_epoch"] = best["epoch"]
        plot_curves(history, run_dir / "curves.png")
    if scores:
        rows, aurocs = label_scores(scores, manifest)
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "label_scores.parquet")
        summary["mislabel_auroc"] = aurocs
        summary["scored_samples"] = len(rows)
        summary["top_suspects"] = [
            {
                k: r[k]
                for k in (
                    "rank",
                    "key",
                    "source",
                    "noisy_label",
                    "predicted_label",
                    "score",
                    "is_noisy",
                )
            }
            for r in rows[:SUSPECTS_SHOWN]
        ]
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(summary_table(summary))
    if scores:
        print(
            "finding the wrong training labels, AUROC: "
            + ", ".join(
                f"{name} score {value:.3f}" for name, value in summary["mislabel_auroc"].items()
            )
        )
        print(f"top suspects (re-review these first), of {summary['scored_samples']}:")
        for r in summary["top_suspects"]:
            print(
                f"  {r['rank']:3d}. {r['source'] or r['key']}  labelled "
                f"{classes[r['noisy_label']]}, model says {classes[r['predicted_label']]}, "
                f"suspicion {r['score']:.3f}{'  (injected)' if r['is_noisy'] else ''}"
            )
    print(f"report: {run_dir}/summary.json, curves.png, label_scores.parquet, metrics.jsonl")
    return summary
