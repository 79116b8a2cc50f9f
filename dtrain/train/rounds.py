"""Label clean-up rounds (`train.refine_rounds`): train, let the run's own ranking propose label
corrections, train again on the corrected labels; no clean label is used.

After a round, a sample's label is changed to the model's prediction when the sample is among
the top q by suspicion (its mean training loss over the last `method.score_epochs` epochs, the
score that finds injected wrong labels best in `benchmarks/study.py`) *and* the prediction
disagrees with its label; q is the fraction of all samples whose prediction disagrees, the
data's own estimate of its noise rate. The next round trains from scratch (or warm, from the
previous round's last weights: `train.refine_init`) on the corrected labels.

Cross-fitted (`train.refine_folds=K`): a round trains K models instead of one, model k with
the labels of fold k hidden (dtrain.train.folds; its contrastive and ELR terms still see those
images), and each sample's suspicion and prediction come from the model that did not see its
label. A round's own training has learnt some of the wrong labels it kept; it then vouches for
them, and relabels clean samples to its own mistakes, which the next round learns back
(docs/results.md). A model that never saw a label cannot vouch for it.

A run folder with rounds holds `rounds/<i>/` (a complete run each, or its folds'
`rounds/<i>/fold<k>/`, with its `corrections.parquet`: key, old, new, suspicion, rank, for a
person to audit) and the final round in the folder itself, so `dtrain eval`, `dtrain.load` and
`dtrain predict` see the final model. A round that finished is not repeated under `--resume`."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa

from dtrain.config import Config, load_config
from dtrain.distributed import from_rank_0
from dtrain.errors import RunFolderError
from dtrain.files import write_atomic, write_json_atomic
from dtrain.train.checkpoint import LAST
from dtrain.train.engine import Engine, make_engine
from dtrain.train.label_scores import loss_score
from dtrain.train.resolve import ResolvedRun
from dtrain.train.trackers import parent_run
from dtrain.train.trainer import EpochHook, StepHook, Trainer

ROUNDS = "rounds"
CORRECTIONS = "corrections.parquet"
CORRECTION_COLUMNS = ("key", "old", "new", "suspicion", "rank", "was_wrong")


def round_dirs(run_dir: Path, rounds: int) -> list[Path]:
    """Where each round runs: `rounds/0 .. rounds/R-1`, then the run folder itself."""
    return [run_dir / ROUNDS / str(i) for i in range(rounds)] + [run_dir]


def fold_dirs(round_dir: Path, folds: int) -> list[Path]:
    """Where a cross-fitted round trains its models: `fold0 .. fold<K-1>`."""
    return [round_dir / f"fold{k}" for k in range(folds)]


def has_progress(config: Config, saved_only: bool = False) -> bool:
    """Whether any round of this run has written anything (what `--resume auto` looks for);
    `saved_only`: a checkpoint or a finished round, what a fresh start would overwrite."""
    marks = (LAST, CORRECTIONS) if saved_only else (LAST, CORRECTIONS, "config.yaml")
    dirs = round_dirs(config.run_path, config.train.refine_rounds)
    folds = [f for d in dirs[:-1] for f in fold_dirs(d, config.train.refine_folds)]
    return any((d / mark).exists() for d in dirs + folds for mark in marks)


def propose(scores: pa.Table) -> list[dict]:
    """The corrections a finished round proposes from its score rows (`label_scores.SCHEMA`;
    see the module docstring), most suspicious first. `was_wrong` says whether the old label
    was a wrong one, where that is known (the clean label `dtrain prepare` kept); it is
    reported, never used."""
    loss = loss_score(scores)
    label, predicted = (scores.column(c).to_numpy() for c in ("label", "predicted"))
    scored = np.flatnonzero(~np.isnan(loss))
    disagree = int((predicted[scored] != label[scored]).sum())
    ranked = scored[np.argsort(-loss[scored], kind="stable")][:disagree]  # the top q
    ranks = np.arange(1, len(ranked) + 1)
    chosen = predicted[ranked] != label[ranked]
    picked = scores.take(ranked[chosen])
    return [
        {
            "key": row["key"],
            "old": row["label"],
            "new": row["predicted"],
            "suspicion": suspicion,
            "rank": rank,
            "was_wrong": row["is_noisy"],
        }
        for row, suspicion, rank in zip(
            picked.to_pylist(), loss[ranked[chosen]].tolist(), ranks[chosen].tolist(), strict=True
        )
    ]


def write_corrections(path: Path, corrections: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [row[c] for row in corrections] for c in CORRECTION_COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_corrections(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _round_record(
    index: int,
    folder: Path,
    trainer: Trainer,
    scores: pa.Table,
    summaries: list[dict],
    corrections: list[dict],
) -> dict:
    """What a round did, for rounds.json (rank 0: it holds the score rows). A cross-fitted
    round's AUROC and test accuracies are its folds' means."""
    # without injected noise the shipped label is the only one known: the label error and the
    # ranking's AUROC against it would only measure the corrections themselves
    known = trainer.meta.get("noise", {}).get("model", "none") != "none"
    wrong = int(scores.column("is_noisy").to_numpy().sum())
    aurocs = [s.get("mislabel_auroc", {}) for s in summaries]

    def test(which: str) -> float | None:
        found = [(s.get(which) or {}).get("clean_accuracy") for s in summaries]
        found = [f for f in found if f is not None]
        return float(np.mean(found)) if found else None

    return {
        "round": index,
        "run_dir": str(folder),
        "folds": len(summaries) if len(summaries) > 1 else 0,
        "clean_labels_known": known,
        "labels_corrected_before": len(trainer.relabel or {}),
        # of the labels this round trained on
        "label_error": wrong / max(1, scores.num_rows) if known else None,
        "mislabel_auroc": {k: float(np.mean([a[k] for a in aurocs])) for k in aurocs[0]},
        "test_best_clean_accuracy": test("test_best"),
        "test_last_clean_accuracy": test("test_last"),
        "corrections": len(corrections),
        "corrections_of_wrong_labels": sum(c["was_wrong"] for c in corrections) if known else None,
    }


def fit_rounds(
    run: ResolvedRun,
    resume: bool = False,
    stop: threading.Event | None = None,
    stop_file: Path | None = None,
    say_resume: bool = False,
    on_epoch_end: EpochHook | None = None,
    on_step: StepHook | None = None,
) -> dict:
    """Every round in turn (one engine shared by all), then `rounds.json` and the rounds added
    to the final summary; returns the final round's summary, or its stop result. `say_resume`:
    print whether the run resumes or starts (what `--resume auto` decided); `on_epoch_end`,
    `on_step`: every round's `Trainer` calls them."""
    config, run_dir = run.config, run.config.run_path
    if resume and not has_progress(config):
        raise RunFolderError(
            f"{run_dir} holds no run to resume (no {LAST}, no config.yaml); "
            "drop --resume to start it"
        )
    if not resume and has_progress(config, saved_only=True):
        raise RunFolderError(
            f"{run_dir} already holds a run; pass --resume to continue it or set train.run_dir "
            "to start a new one"
        )
    engine = make_engine(run)
    if say_resume and engine.is_main:
        print(f"--resume auto: {'resuming' if resume else 'starting'} {run_dir}")
    # an error leaves the engine as it is: closing waits for every rank, and a rank that
    # failed alone would hang there instead of ending the run with its message
    names = config.train.trackers if config.train.refine_rounds else []
    with parent_run(names, run_dir, engine.is_main):
        result = _run_rounds(run, engine, resume, stop, stop_file, (on_epoch_end, on_step))
    engine.close()
    return result


def _run_rounds(
    run: ResolvedRun,
    engine: Engine,
    resume: bool,
    stop: threading.Event | None,
    stop_file: Path | None,
    hooks: tuple[EpochHook | None, StepHook | None],
) -> dict:
    config = run.config
    rounds, run_dir = config.train.refine_rounds, config.run_path
    dirs = round_dirs(run_dir, rounds)
    relabel: dict[str, int] = {}
    records: list[dict] = []
    result: dict = {}
    folds = config.train.refine_folds
    for index, folder in enumerate(dirs):
        corrections_file = folder / CORRECTIONS
        final = folder == run_dir
        if not final and corrections_file.is_file():  # finished earlier
            _check_same_config(fold_dirs(folder, folds)[0] if folds else folder, config)
            records.append(json.loads((folder / "round.json").read_text()))
            relabel.update({c["key"]: c["new"] for c in read_corrections(corrections_file)})
            continue
        if engine.is_main and rounds:
            print(f"label clean-up round {index} of {rounds} in {folder}")
        # (run folder, hidden fold): one training, or one per fold of a cross-fitted round
        runs = [(folder, None)]
        if folds and not final:
            runs = [(d, (k, folds)) for k, d in enumerate(fold_dirs(folder, folds))]
        tables, summaries = [], []
        for where, hidden in runs:
            trainer = Trainer(
                run.with_run_dir(str(where)),
                on_epoch_end=hooks[0],
                on_step=hooks[1],
                resume=resume and (where / "config.yaml").exists(),
                stop=stop,
                stop_file=stop_file,
                engine=engine,
                relabel=dict(relabel),
                init_weights=_warm_start(config, dirs, index),
                hidden_fold=hidden,
            )
            result = trainer.fit()
            if result.get("stopped"):
                return result
            tables.append(trainer.scores.table)  # a fold's rows: only the samples it hid
            summaries.append(result)
        scores = pa.concat_tables(tables) if engine.is_main else None
        corrections = []
        if not final:  # rank 0 holds the score rows: it proposes for every rank
            corrections = from_rank_0(propose(scores) if engine.is_main else None)
        if engine.is_main:
            record = _round_record(index, folder, trainer, scores, summaries, corrections)
            records.append(record)
            if folder != run_dir:  # round.json before the corrections: they mark it done
                write_json_atomic(folder / "round.json", record)
                write_corrections(corrections_file, corrections)
        relabel.update({c["key"]: c["new"] for c in corrections})
    if engine.is_main and rounds:
        result["rounds"] = records
        write_json_atomic(run_dir / "summary.json", result)
        write_json_atomic(run_dir / "rounds.json", records)
        print(rounds_table(records))
    return result


def _check_same_config(folder: Path, config: Config) -> None:
    """A finished round is reused only for the config it was trained with."""
    saved = load_config(folder / "config.yaml").result_identity()
    wanted = config.result_identity()
    differ = [
        f"{section}.{key}"
        for section, values in wanted.items()
        for key, value in values.items()
        if saved[section].get(key) != value
    ]
    if differ:
        raise RunFolderError(
            f"{folder} (a finished round) was trained with a different config "
            f"({', '.join(differ)}); resume with its config.yaml or start a new train.run_dir"
        )


def _warm_start(config: Config, dirs: list[Path], index: int) -> Path | None:
    if config.train.refine_init != "warm" or index == 0:
        return None
    return dirs[index - 1] / LAST


def rounds_table(records: list[dict]) -> str:
    """One line per round: its labels, how well its ranking found their errors, its model."""
    lines = [
        f"{'round':>5s}{'label error':>13s}{'AUROC loss':>12s}{'corrected':>11s}"
        f"{'of them wrong':>15s}{'test acc selected':>19s}{'last':>8s}"
    ]
    for r in records:
        best, last = r["test_best_clean_accuracy"], r["test_last_clean_accuracy"]
        found = r["mislabel_auroc"].get("loss", math.nan)
        error, of_them = r["label_error"], r["corrections_of_wrong_labels"]
        lines.append(
            f"{r['round']:5d}{math.nan if error is None else error:13.3f}{found:12.3f}"
            f"{r['corrections']:11d}{'–' if of_them is None else str(of_them):>15s}"
            f"{best if best is not None else math.nan:19.3f}"
            f"{last if last is not None else math.nan:8.3f}"
        )
    return "label clean-up rounds (label error and test accuracy against the clean labels):\n" + (
        "\n".join(lines)
    )
