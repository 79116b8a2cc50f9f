"""What a run leaves for a person: progress bars, one line per epoch, the mislabel ranking
(`label_scores.parquet`), train/val curves (`curves.png`) and a summary table
(`summary.json`, printed)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtrain.config import Config
from dtrain.files import write_atomic
from dtrain.train.label_scores import attention_score, loss_score
from dtrain.train.metrics import auroc

if TYPE_CHECKING:
    import pyarrow as pa

    from dtrain.train.checkpoint import CheckpointSaver, TrainState

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


def knows_clean_labels(meta: dict) -> bool:
    """Whether a dataset's clean labels are known: only where its noise was injected on purpose
    (`dtrain prepare --noise`); elsewhere `clean_label` is the label as shipped, and a "clean"
    figure would only repeat the other one."""
    return meta.get("noise", {}).get("model", "none") != "none"


def epoch_line(record: dict, clean_known: bool) -> str:
    val = ""
    if "val_accuracy" in record:
        val = f"  val acc {record['val_accuracy']:.3f}"
        if clean_known:
            val += f" (clean {record['val_clean_accuracy']:.3f})"
    return (
        f"epoch {record['epoch']:3d}  loss {record['train_loss']:.3f}  "
        f"train acc {record['train_accuracy']:.3f}{val}  {record['images_per_s']:.0f} img/s"
    )


def no_split_notes(data_dir: Path, run_dir: Path, splits: list[str]) -> dict[str, str]:
    """What a run does without a val or a test split (said once at its start), by split."""
    notes = {
        "val": f"no val split in {data_dir}: best.pt follows the last epoch",
        "test": f"no test split in {data_dir}: the final test is skipped; score a test set "
        f"with `dtrain eval {run_dir} --data TEST_SET`",
    }
    return {split: note for split, note in notes.items() if split not in splits}


class RunLog:
    """metrics.jsonl (one JSON record per line, appended), TensorBoard and the other trackers of
    `train.trackers` (`dtrain.train.trackers`), on the main rank. Opened at a run's `state`
    (step and epoch 0 for a fresh start), it first drops the records a crashed attempt logged
    after that point, so that a resumed run's log has each step once; it hears of each
    checkpoint from `saver`."""

    def __init__(
        self, run_dir: Path, state: TrainState, config: Config, saver: CheckpointSaver
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _logged_before(line, state.step, state.epoch)
            ]
            write_atomic(self.path, "".join(f"{line}\n" for line in kept))
        names = config.train.trackers
        self.tensorboard = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.trackers = None
        if set(names) - {"tensorboard"}:
            from dtrain.train.trackers import Trackers

            self.trackers = Trackers(
                names, run_dir, config.to_dict(), state.tracker_runs, state.step
            )
            saver.listeners.append(self.trackers.saved)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.write(record)
        if self.tensorboard is None:
            return
        where = record["step"] if record["kind"] == "step" else record["epoch"]
        for name, value in record.items():
            numeric = isinstance(value, float) and math.isfinite(value)
            if numeric and name not in ("kind", "step", "epoch"):
                self.tensorboard.add_scalar(f"{record['kind']}/{name}", value, where)

    def finish(self, summary: dict, selection_text: str) -> None:
        """The end of a finished run, for the trackers: test metrics, selection, artifacts."""
        if self.trackers is not None:
            self.trackers.finish(summary, selection_text)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.trackers is not None:
            self.trackers.close()


def _logged_before(line: str, step: int, epoch: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # the last line of a log cut off by a crash
        return False
    return record["step"] <= step if record["kind"] == "step" else record["epoch"] <= epoch


def label_scores(scores: pa.Table, manifest: Path) -> tuple[pa.Table, dict[str, float]]:
    """The rows of `scores` (`label_scores.SCHEMA`) ranked most suspicious first, and the AUROC
    of each score for finding the labels that were made wrong on purpose (known from the clean
    label kept beside each sample). Columnar throughout: a million samples are a few arrays.

    Suspicion is 1 - the mean attention weight where the method has one, else the mean
    per-sample loss: high means "this label looks wrong". Samples never scored by the attention
    (seen only before the mixup warm-up ended) rank after the others; the attention AUROC
    counts only the samples it scored."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    keys = scores.column("key")
    sources = pa.nulls(len(keys), pa.string())
    if manifest.is_file():
        listed = pq.read_table(manifest, columns=["key", "source"])
        at = pc.index_in(keys, value_set=listed.column("key"))
        sources = listed.column("source").take(at)
    attention, loss = attention_score(scores), loss_score(scores)
    has_attention = bool((scores.column("attention_count").to_numpy() > 0).any())
    score = 1 - attention if has_attention else loss
    # stable: ties keep the order the samples were first scored in
    order = np.argsort(np.where(np.isnan(score), np.inf, -score), kind="stable")
    ranked = pa.table(
        {
            "key": keys,
            "source": pc.fill_null(sources, ""),
            "noisy_label": scores.column("label"),
            "predicted_label": scores.column("predicted"),
            "attention_score": attention,
            "loss_score": loss,
            "is_noisy": scores.column("is_noisy"),
            "score": score,
        }
    ).take(order)
    ranked = ranked.append_column("rank", pa.array(np.arange(1, len(order) + 1)))
    truth = ranked.column("is_noisy").to_numpy()
    aurocs = {"loss": auroc(loss[order], truth)}
    if has_attention:
        suspicion = 1 - attention[order]
        scored = ~np.isnan(suspicion)
        aurocs["attention"] = auroc(suspicion[scored], truth[scored])
    return ranked, aurocs


def plot_curves(history: list[dict], path: Path, clean_known: bool) -> None:
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
    labels = "clean" if clean_known else "as shipped"
    if "val_accuracy" in history[-1]:
        right.plot(epochs, [r["val_accuracy"] for r in history], label="val (labels as shipped)")
        if clean_known:
            right.plot(
                epochs, [r["val_clean_accuracy"] for r in history], label="val (clean labels)"
            )
    if "val_ema_accuracy" in history[-1]:
        ema = "val_ema_clean_accuracy" if clean_known else "val_ema_accuracy"
        right.plot(  # epochs resumed from before the run kept an average have none
            epochs,
            [r.get(ema, math.nan) for r in history],
            label=f"val, EMA ({labels} labels)",
        )
    right.set_xlabel("epoch")
    right.set_title("accuracy")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    write_atomic(path, figure_png(fig))


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (for an atomic write); the figure is closed."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=dpi)
    plt.close(fig)
    return image.getvalue()


def summary_table(summary: dict, clean_known: bool) -> str:
    """The test metrics of each set of weights, against the clean labels where the dataset
    knows them, else against the labels as shipped."""
    names = ["accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece"]
    heading, prefix = "test (clean labels)", "clean_"
    if not clean_known:
        heading, prefix = "test (as shipped)", ""
    lines = [f"{heading:22s}" + "".join(f"{n:>19s}" for n in names)]
    rows = {"best": "selected (best.pt)", "last": "last epoch", "ema_last": "last EMA"}
    for which, title in rows.items():
        metrics = summary.get(f"test_{which}")
        if metrics is None:
            continue
        lines.append(f"{title:22s}" + "".join(f"{metrics[prefix + n]:19.4f}" for n in names))
    return "\n".join(lines)


def selection_table(picked: dict, clean_known: bool) -> str:
    """What each selection rule would have picked, the chosen one marked."""
    lines = [
        f"model selection: {picked['rule']} ({picked['describe']}) picked "
        + ("no epoch" if picked["epoch"] is None else f"epoch {picked['epoch']}")
        + (
            ""
            if picked.get("ema_decay") is None
            else f"; weight average decay {picked['ema_decay']:.4f}"
        ),
        f"  {'rule':20s}{'epoch':>6s}  {'weights':8s}{'val acc (as shipped)':>22s}"
        + (f"{'val acc (clean)':>17s}" if clean_known else ""),
    ]
    for row in picked["candidates"]:
        mark = "*" if row["rule"] == picked["rule"] else " "
        shipped, clean = (
            "–" if row[k] is None else f"{row[k]:.3f}"
            for k in ("val_accuracy", "val_clean_accuracy")
        )
        lines.append(
            f"{mark} {row['rule']:20s}{row['epoch'] or 'none':>6}  "
            f"{row['weights']:8s}{shipped:>22s}" + (f"{clean:>17s}" if clean_known else "")
        )
    return "\n".join(lines)


def write_run_report(
    run_dir: Path,
    config: Config,
    history: list[dict],
    scores: pa.Table,
    *,
    test_best: dict | None,
    test_last: dict | None,
    test_ema: dict | None = None,
    selection: dict | None = None,
    clean_known: bool = True,
    test_skipped: str | None = None,
    manifest: Path,
    classes: list[str],
    skipped: tuple[int, list[str]] = (0, []),
) -> dict:
    """summary.json, curves.png and label_scores.parquet (each written atomically), and the
    summary table, AUROCs and top suspects printed; returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    summary = {
        "method": config.method.name,
        "epochs": len(history),
        "test_best": test_best,  # the selected weights (best.pt, train.select)
        "test_last": test_last,
        "test_ema_last": test_ema,  # the weight average at the last epoch
        "test_skipped": test_skipped,  # why there is no test (no test split), else null
        "best_epoch": selection["epoch"] if selection else None,
        "selection": selection,
        "mislabel_auroc": {},
        # samples the loader could not use (data.strict=false), and why (the first ones)
        "skipped_samples": {"count": skipped[0], "which": skipped[1]},
    }
    if history:
        plot_curves(history, run_dir / "curves.png", clean_known)
    if scores.num_rows:
        ranked, aurocs = label_scores(scores, manifest)
        sink = pa.BufferOutputStream()
        pq.write_table(ranked, sink)
        write_atomic(run_dir / "label_scores.parquet", sink.getvalue().to_pybytes())
        # without injected noise there is nothing known to find (in a clean-up round the
        # shipped label would only mark the corrections)
        summary["mislabel_auroc"] = aurocs if clean_known else {}
        summary["scored_samples"] = ranked.num_rows
        shown = ("rank", "key", "source", "noisy_label", "predicted_label", "score", "is_noisy")
        summary["top_suspects"] = ranked.select(shown).slice(0, SUSPECTS_SHOWN).to_pylist()
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if selection is not None and "val_accuracy" in history[-1]:
        print(selection_table(selection, clean_known))
    if test_last is not None:
        print(summary_table(summary, clean_known))
    if skipped[0]:
        print(f"skipped {skipped[0]} sample(s) the loader could not use; summary.json says which")
    if summary["mislabel_auroc"]:
        print(
            "finding the wrong training labels, AUROC: "
            + ", ".join(
                f"{name} score {value:.3f}" for name, value in summary["mislabel_auroc"].items()
            )
        )
    if scores.num_rows:
        print(f"top suspects (re-review these first), of {summary['scored_samples']}:")
        for r in summary["top_suspects"]:
            injected = "  (injected)" if clean_known and r["is_noisy"] else ""
            print(
                f"  {r['rank']:3d}. {r['source'] or r['key']}  labelled "
                f"{classes[r['noisy_label']]}, model says {classes[r['predicted_label']]}, "
                f"suspicion {r['score']:.3f}{injected}"
            )
    print(f"report: {run_dir}/summary.json, curves.png, label_scores.parquet, metrics.jsonl")
    return summary
