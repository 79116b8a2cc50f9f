"""cleanlab as the study's anchor (`benchmarks/study.py` runs it once every method has a seed):

(a) detection: cleanlab's ranking (`find_label_issues`, and its self-confidence label quality
    for a full ranking) from 5-fold out-of-fold CE predictions on the training split, against
    dtrain's own scores from the `iam` run of the same data and seed (loss and attention):
    AUROC and precision at the true number of wrong labels;
(b) accuracy: cleanlab's prune-and-retrain (CleanLearning's recipe: drop the issues it finds,
    retrain CE) against dtrain's clean-up rounds (`iam+rounds`).

Folds and the pruned set are new datasets written by `dtrain prepare` from a manifest of the
study dataset's own images and (noisy) labels, near-duplicate groups kept within one fold. The
folds' models are CE runs like the study's; a fold's held-out part is its test split, scored
with `dtrain eval --out`. Results: runs/study/cleanlab/<noise>_seed<s>.json."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from common import preset

from dtrain.files import write_json_atomic
from dtrain.prepare.sources import embedded_root
from dtrain.train.metrics import auroc

FOLDS = 5
ANCHOR_DIR = "cleanlab"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # beside another run, one core each
# cleanlab keeps intermediate arrays in module globals: one anchor at a time inside it
CLEANLAB = threading.Lock()


def _rows(dataset: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(dataset / "manifest.parquet").to_pylist()


def _write_manifest(path: Path, rows: list[dict], classes: list[str], split_of) -> Path:
    root = embedded_root()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "group"])
        for row in rows:
            split = split_of(row)
            if split is not None:
                writer.writerow(
                    [root / row["source"], classes[row["noisy_label"]], split, row["group"]]
                )
    return path


def _prepare(manifest: Path, out: Path) -> Path:
    if not (out / "dataset.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dtrain",
                "prepare",
                str(manifest),
                "--out",
                str(out),
                "--noise",
                "none",
                "--resize",
                "40",
                "--group-column",
                "group",
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=ENV,
        )
    return out


def _train_ce(data: Path, run_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    if not (run_dir / "summary.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dtrain",
                "train",
                "--resume",
                "auto",  # a fold cut off continues
                "--config",
                str(preset("ce")),
                f"data.path={data}",
                f"data.image_size={args.image_size}",
                f"model.backbone={args.backbone}",
                f"train.epochs={args.epochs}",
                f"train.seed={seed}",
                f"train.run_dir={run_dir}",
                "train.refine_rounds=0",
                "train.progress=false",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=ENV,
        )
    return json.loads((run_dir / "summary.json").read_text())


def _out_of_fold(rows, classes, seed, args, work: Path) -> dict[str, np.ndarray]:
    """Each training sample's CE probabilities from the fold model that did not train on it."""
    import pyarrow.parquet as pq

    train = [r for r in rows if r["split"] == "train"]
    groups = sorted({r["group"] for r in train})
    random.Random(seed).shuffle(groups)
    fold_of = {g: i % FOLDS for i, g in enumerate(groups)}
    by_source = {r["source"]: r["key"] for r in train}
    root = str(embedded_root())
    probs: dict[str, np.ndarray] = {}
    for fold in range(FOLDS):

        def split_of(row, fold=fold):
            if row["split"] == "train":
                return "test" if fold_of[row["group"]] == fold else "train"
            return "val" if row["split"] == "val" else None

        manifest = _write_manifest(work / f"fold{fold}.csv", rows, classes, split_of)
        data = _prepare(manifest, work / f"fold{fold}_data")
        run = work / f"fold{fold}_run"
        _train_ce(data, run, seed, args)
        out = work / f"fold{fold}_eval"
        if not (out / "predictions.parquet").is_file():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dtrain",
                    "eval",
                    str(run),
                    "--split",
                    "test",
                    "--out",
                    str(out),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                env=ENV,
            )
        table = pq.read_table(out / "predictions.parquet").to_pylist()
        fold_sources = {r["key"]: r["source"] for r in _rows(data) if r["split"] == "test"}
        for row in table:
            source = fold_sources[row["key"]]
            source = source[len(root) + 1 :] if source.startswith(root) else source
            probs[by_source[source]] = np.array([row[f"prob_{c}"] for c in classes])
    return probs


def _detection(suspicion: np.ndarray, truth: np.ndarray) -> dict:
    n = int(truth.sum())
    top = np.argsort(-suspicion, kind="stable")[:n]
    return {"auroc": auroc(suspicion, truth), "precision_at_true_count": float(truth[top].mean())}


def run_anchor(noise: str, seed: int, args: argparse.Namespace, dataset: Path) -> dict:
    """Both comparisons for one noise kind and seed, added to runs/study/cleanlab.json."""
    import pyarrow.parquet as pq
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    name = f"{noise}/seed{seed}"
    result_path = Path(args.runs) / ANCHOR_DIR / f"{noise}_seed{seed}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    print(f"cleanlab anchor: {name}", flush=True)
    work = Path(args.runs) / ANCHOR_DIR / noise / f"seed{seed}"
    rows = _rows(dataset)
    classes = json.loads((dataset / "dataset.json").read_text())["classes"]
    probs = _out_of_fold(rows, classes, seed, args, work)
    train = [r for r in rows if r["split"] == "train" and r["key"] in probs]
    labels = np.array([r["noisy_label"] for r in train])
    truth = np.array([r["is_noisy"] for r in train])
    pred = np.stack([probs[r["key"]] for r in train])
    with CLEANLAB:
        issues = find_label_issues(labels, pred, filter_by="prune_by_noise_rate", n_jobs=1)
        quality = get_label_quality_scores(labels, pred)
    detection = {
        "cleanlab": {
            **_detection(1 - quality, truth),
            "issues_found": int(issues.sum()),
            "issues_precision": float(truth[issues].mean()) if issues.any() else None,
        }
    }
    ours = pq.read_table(Path(args.runs) / noise / f"iam_seed{seed}" / "label_scores.parquet")
    ours = {r["key"]: r for r in ours.to_pylist()}
    for score in ("loss_score", "attention_score"):
        values = np.array([ours[r["key"]][score] for r in train], dtype=float)
        if score == "attention_score":
            values = 1 - values
        detection[f"dtrain_{score}"] = _detection(np.nan_to_num(values, nan=-1.0), truth)
    dropped = {r["key"] for r, flagged in zip(train, issues, strict=True) if flagged}
    manifest = _write_manifest(
        work / "pruned.csv",
        rows,
        classes,
        lambda r: None if r["key"] in dropped else r["split"],
    )
    summary = _train_ce(_prepare(manifest, work / "pruned_data"), work / "pruned_run", seed, args)
    result = {
        "name": name,
        "noise": noise,
        "seed": seed,
        "train_samples": len(train),
        "wrong_labels": int(truth.sum()),
        "detection": detection,
        "prune_and_retrain": {
            "dropped": len(dropped),
            "dropped_wrong": int(truth[issues].sum()),
            "selected_acc": summary["test_best"]["clean_accuracy"],
            "last_acc": summary["test_last"]["clean_accuracy"],
        },
    }
    write_json_atomic(result_path, result)
    return result


def collect(runs: Path) -> list[dict]:
    """Every anchor result so far."""
    return [json.loads(p.read_text()) for p in sorted((runs / ANCHOR_DIR).glob("*.json"))]


def anchor_table(results: list[dict], study_rows: list[dict]) -> str:
    """Markdown: detection (AUROC, precision at the true count) and accuracy beside the
    study's `iam+rounds` and `ce` on the same noise and seed."""
    lines = [
        "| noise / seed | cleanlab AUROC | P@N | dtrain loss AUROC | P@N | dtrain attention AUROC "
        "| P@N | prune+retrain CE acc (selected / last) | iam+rounds acc (selected / last) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["name"]
        d = r["detection"]
        ours = [
            x
            for x in study_rows
            if x["noise"] == r["noise"] and x["seed"] == r["seed"] and x["method"] == "iam+rounds"
        ]
        mine = f"{ours[0]['selected_acc']:.3f} / {ours[0]['last_acc']:.3f}" if ours else "–"
        p = r["prune_and_retrain"]
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{d[k]['auroc']:.3f} | {d[k]['precision_at_true_count']:.3f}"
                for k in ("cleanlab", "dtrain_loss_score", "dtrain_attention_score")
            )
            + f" | {p['selected_acc']:.3f} / {p['last_acc']:.3f} | {mine} |"
        )
    return "\n".join(lines)
