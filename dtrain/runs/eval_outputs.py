"""What `dtrain eval` and `dtrain predict` leave: one row per image (`predictions.parquet`:
class probabilities, the predicted class and, for a labelled image, how suspicious its label
looks), and for eval the metrics and the confusion matrix as a table and a picture. Every file
is written to a temp name and renamed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtrain.files import write_atomic
from dtrain.train.report import figure_png

if TYPE_CHECKING:
    import pyarrow as pa


def predictions_table(
    ids: dict[str, np.ndarray],
    probs: np.ndarray,
    classes: list[str],
    labels: np.ndarray | None = None,
    clean_labels: np.ndarray | None = None,
) -> pa.Table:
    """`ids` columns (key, path), then label (and clean_label), predicted, prob_<class> and
    suspicion = 1 - p(given label): high means the label looks wrong."""
    import pyarrow as pa

    names = np.asarray(classes, dtype=object)
    columns = {name: list(values) for name, values in ids.items()}
    if labels is not None:
        columns["label"] = names[labels].tolist()
    if clean_labels is not None:
        columns["clean_label"] = names[clean_labels].tolist()
    columns["predicted"] = names[probs.argmax(1)].tolist() if len(probs) else []
    for c, name in enumerate(classes):
        columns[f"prob_{name}"] = probs[:, c]
    if labels is not None:
        columns["suspicion"] = 1 - probs[np.arange(len(labels)), labels]
    return pa.table(columns)


def write_parquet(path: Path, table: pa.Table) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return write_atomic(path, sink.getvalue().to_pybytes())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows the true (given) class, columns the predicted one."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_csv(matrix: np.ndarray, classes: list[str]) -> str:
    import csv

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    return text.getvalue()


def confusion_png(matrix: np.ndarray, classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (label as given)")
    ax.set_title(title)
    dark = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > dark else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=colour)
    fig.tight_layout()
    return figure_png(fig)


def write_eval_outputs(
    folder: Path,
    metrics: dict,
    p: dict[str, np.ndarray],
    classes: list[str],
    with_clean: bool,
    title: str,
) -> None:
    """metrics.json, confusion_matrix.csv/.png and predictions.parquet in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    matrix = confusion_matrix(p["label"], p["probs"].argmax(1), len(classes))
    write_atomic(folder / "confusion_matrix.csv", confusion_csv(matrix, classes))
    write_atomic(folder / "confusion_matrix.png", confusion_png(matrix, classes, title))
    table = predictions_table(
        {"key": p["key"], "path": p["path"]},
        p["probs"],
        classes,
        p["label"],
        p["clean_label"] if with_clean else None,
    )
    write_parquet(folder / "predictions.parquet", table)
