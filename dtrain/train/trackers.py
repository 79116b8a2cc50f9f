"""Experiment trackers beside metrics.jsonl (`train.trackers`): MLflow and Weights & Biases,
through Accelerate's tracker classes, on the main rank only (`report.RunLog` lives there).
Their settings come from their own environment variables (`MLFLOW_TRACKING_URI`,
`MLFLOW_EXPERIMENT_NAME`, `WANDB_MODE`, `WANDB_PROJECT`, ...).

Each step appears once in a tracked run, even across a kill and `--resume`: neither MLflow nor
W&B can delete a logged point, so a step record is held back until a checkpoint covers it
(`saved`), and only then sent. A crash loses just the records past the last checkpoint, the
ones `RunLog` also cuts from metrics.jsonl and the resumed run logs again. An epoch record is
written after its own checkpoint and goes out at once. The tracked run's id is kept in the
checkpoint (`TrainState.tracker_runs`), so that a resumed run continues the same one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtrain.files import write_json_atomic


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config or summary as `section.key` entries."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def metric_values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's numbers under TensorBoard's names (`step/loss`,
    `epoch/val_accuracy`): a step record and an epoch record share some names."""
    return {
        f"{record['kind']}/{name}": float(value)
        for name, value in record.items()
        if name not in ("kind", "step", "epoch")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class Trackers:
    """The tracked runs of one training run; `run_ids` (the checkpoint's, by tracker) is filled
    in with the runs started, `step` is where the run resumes (0: a fresh start)."""

    def __init__(
        self, names: list[str], run_dir: Path, config: dict, run_ids: dict[str, str], step: int
    ) -> None:
        self.run_dir, self.saved_step = run_dir, step
        self.pending: list[dict] = []
        self.trackers: list[Any] = []
        for name in names:
            if name == "mlflow":
                self.trackers.append(self._mlflow(run_ids.get("mlflow")))
            elif name == "wandb":
                self.trackers.append(self._wandb(run_ids.get("wandb")))
        for tracker in self.trackers:
            if tracker.name not in run_ids:  # a resumed run keeps its params as first logged
                tracker.store_init_configuration(flatten(config))
            run_ids[tracker.name] = self._run_id(tracker)

    def _mlflow(self, run_id: str | None) -> Any:
        import mlflow
        from accelerate.tracking import MLflowTracker

        tracker = MLflowTracker(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "dtrain"),
            run_id=run_id,
            run_name=self.run_dir.name,
            nested_run=mlflow.active_run() is not None,  # a clean-up round's parent run
        )
        tracker.main_process_only = False  # built on rank 0 only, under DeepSpeed too
        tracker.start()
        return tracker

    def _wandb(self, run_id: str | None) -> Any:
        from accelerate.tracking import WandBTracker

        tracker = WandBTracker(
            os.environ.get("WANDB_PROJECT", "dtrain"),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR", str(self.run_dir)),
        )
        tracker.main_process_only = False  # built on rank 0 only, under DeepSpeed too
        tracker.start()
        for kind in ("step", "epoch"):  # two x axes: optimiser steps and epochs
            tracker.run.define_metric(f"{kind}/*", step_metric=f"{kind}/{kind}")
        return tracker

    @staticmethod
    def _run_id(tracker: Any) -> str:
        return tracker.active_run.info.run_id if tracker.name == "mlflow" else tracker.run.id

    def write(self, record: dict) -> None:
        """Send a metrics.jsonl record, or hold a step record until a checkpoint covers it."""
        if record["kind"] == "step" and record["step"] > self.saved_step:
            self.pending.append(record)
        else:
            self._send(record)

    def saved(self, step: int) -> None:
        """A checkpoint at `step` was written: what it covers is now final."""
        self.saved_step = step
        ready = [r for r in self.pending if r["step"] <= step]
        self.pending = [r for r in self.pending if r["step"] > step]
        for record in ready:
            self._send(record)

    def _send(self, record: dict) -> None:
        values, where = metric_values(record), record[record["kind"]]
        for tracker in self.trackers:
            if tracker.name == "mlflow":
                tracker.log(values, step=int(where))
            else:
                tracker.log({**values, f"{record['kind']}/{record['kind']}": where})

    def finish(self, summary: dict, selection_text: str) -> None:
        """The end of a finished run: test metrics, the selection table and the artifacts."""
        test = {
            f"{name}/{key}": value
            for name in ("test_best", "test_last", "test_ema_last")
            for key, value in (summary.get(name) or {}).items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        }
        files = ["curves.png", "summary.json", "label_scores.parquet", "model.safetensors"]
        paths = [self.run_dir / f for f in files if (self.run_dir / f).is_file()]
        with tempfile.TemporaryDirectory() as tmp:
            paths.append(Path(tmp) / "selection.txt")
            paths[-1].write_text(selection_text + "\n")
            for tracker in self.trackers:
                if tracker.name == "mlflow":
                    from mlflow import MlflowClient

                    run_id = self._run_id(tracker)
                    client = MlflowClient()
                    if test:
                        tracker.log(test)
                    for path in paths:
                        client.log_artifact(run_id, str(path))
                else:
                    tracker.run.summary.update(test)
                    for path in paths:
                        tracker.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        """Send what is held back (the run ends here, not at a crash) and end the runs."""
        for record in self.pending:
            self._send(record)
        for tracker in self.trackers:
            tracker.finish()


@contextlib.contextmanager
def parent_run(names: list[str], run_dir: Path, is_main: bool) -> Iterator[None]:
    """Clean-up rounds: an MLflow run for the whole job, under which each round's run nests
    (it is the active run when the round starts). Its id is kept in `rounds/`, beside the
    rounds, so that `--resume` continues it too."""
    if not is_main or "mlflow" not in names:
        yield
        return
    import mlflow

    saved = run_dir / "rounds" / "mlflow_run.json"
    run_id = json.loads(saved.read_text())["run_id"] if saved.is_file() else None
    experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dtrain"))
    with mlflow.start_run(
        run_id=run_id, experiment_id=experiment.experiment_id, run_name=run_dir.name
    ) as run:
        if run_id is None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(saved, {"run_id": run.info.run_id})
        yield


def track_under_search(search_name: str) -> None:
    """A search's trials: one MLflow experiment, one W&B group, named after the search."""
    os.environ["MLFLOW_EXPERIMENT_NAME"] = search_name
    os.environ["WANDB_RUN_GROUP"] = search_name


def tag_best_trial(run_dir: Path) -> None:
    """Tag the tracked MLflow run of a search's best trial (`dtrain.best_trial=true`)."""
    import torch

    state = torch.load(run_dir / "last.pt", weights_only=True, mmap=True)["state"]
    run_id = state.get("tracker_runs", {}).get("mlflow")
    if run_id is not None:
        from mlflow import MlflowClient

        MlflowClient().set_tag(run_id, "dtrain.best_trial", "true")
