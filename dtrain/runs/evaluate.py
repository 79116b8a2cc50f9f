"""`dtrain eval RUN_DIR`: a finished run's checkpoint on a split of its own dataset or of any
other prepared dataset with the same classes, in one process, whatever the run trained on:
metrics printed as JSON, and metrics, confusion matrix and per-image predictions written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dtrain.dataset.format import dataset_splits, read_dataset_json
from dtrain.errors import DataError
from dtrain.runs.eval_outputs import write_eval_outputs
from dtrain.runs.load import check_classes, dataset_predictions, load_trained
from dtrain.runs.run_folder import run_config, run_dataset
from dtrain.train.evaluation import prediction_metrics
from dtrain.train.metrics import CLASS_AVERAGE_RULE


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    which: str = "best",
    data: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """Metrics of `which` checkpoint (best or last) on `split` of `data` (default: the run's
    dataset); the files go to `out` (default RUN_DIR/eval/<dataset folder>-<split>/)."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    if data is None:
        data_dir = run_dataset(run_dir)
    else:
        data_dir = Path(data)
        if not (data_dir / "dataset.json").is_file():
            raise DataError(
                f"--data {data_dir} holds no dataset.json; create it with dtrain prepare"
            )
    meta = read_dataset_json(str(data_dir))
    if split not in dataset_splits(meta):
        raise DataError(
            f"{data_dir} has no {split} split (it has {', '.join(dataset_splits(meta))}); "
            "choose one with --split"
        )
    trained = load_trained(run_dir, which)
    check_classes(meta["classes"], trained.classes, data_dir, run_dir)
    p = dataset_predictions(
        trained,
        data_dir,
        [split],
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        strict=config.data.strict,
        show_progress=sys.stderr.isatty(),
    )
    metrics = prediction_metrics(p) | {"class_average": CLASS_AVERAGE_RULE}
    # clean labels only where the dataset kept them apart from injected noise
    with_clean = meta.get("noise", {}).get("model", "none") != "none"
    if not with_clean:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("clean_")}
    folder = Path(out) if out else run_dir / "eval" / f"{data_dir.name}-{split}"
    title = f"{run_dir.name} ({which}) on {data_dir.name} {split}"
    write_eval_outputs(folder, metrics, p, trained.classes, with_clean, title)
    print(
        f"wrote {folder}: metrics.json, confusion_matrix.csv and .png, predictions.parquet "
        f"(weights from {trained.weights})"
    )
    result = {"run": str(run_dir), "checkpoint": which, "data": str(data_dir), "split": split}
    print(json.dumps({**result, **metrics}, indent=2))
    return metrics
