"""One trial of a search: a real dtrain run (`dtrain.train.train`, as `dtrain train` runs it)
with the trial's sampled values, in `<search>/trials/<trial id>`. After each epoch it reports
the epoch record, the objective and its checkpoint to Ray, so that ASHA can stop it and a
restored search (or a retry after a failure) continues it from that checkpoint.

A trial of one process runs in the Tune trial itself; a trial of several runs under Ray Train's
`TorchTrainer`, one worker per process, exactly as the same run under torchrun would."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.config import Config, apply_method_implies, config_from_dict, set_key
from dtrain.files import promote
from dtrain.train.checkpoint import LAST, SHARDS

OBJECTIVE = "objective"
CHECKPOINT_FILES = (LAST, "config.yaml")


@dataclass
class TrialJob:
    """What every trial of a search shares (passed with `tune.with_parameters`)."""

    base: dict
    explicit_keys: set[str]
    folder: str
    metric: str
    window: int
    workers: int
    cpus: float
    gpus: float

    def config(self, values: dict[str, Any], run_dir: Path) -> Config:
        """The base config with the trial's values; the run folder is the trial's."""
        config = config_from_dict(self.base)
        config.explicit_keys = set(self.explicit_keys)
        for key, value in values.items():
            set_key(config, key, value)
            config.explicit_keys.add(key)
        apply_method_implies(config)  # a searched method.name brings its own defaults
        set_key(config, "train.run_dir", str(run_dir))
        set_key(config, "train.progress", False)  # one line per epoch in the trial's log
        config.validate()
        return config


def objective(history: list[dict], metric: str, window: int) -> float:
    """The metric averaged over the last `window` epochs (fewer while fewer exist): one epoch's
    value on a few hundred noisy val labels is too noisy to rank trials by."""
    values = [float(r[metric]) for r in history[-window:] if metric in r]
    return sum(values) / len(values) if values else math.nan


def _report_record(record: dict, history: list[dict], job: TrialJob) -> dict:
    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    metrics[OBJECTIVE] = objective(history, job.metric, job.window)
    return metrics


def _checkpoint_dir(last: Path) -> Path:
    """A folder of hard links to the run's checkpoint files (and its DeepSpeed shards, which
    `last.pt` names), for Ray to persist."""
    run_dir = last.parent
    folder = Path(tempfile.mkdtemp(prefix=".ray_checkpoint_", dir=run_dir))
    for name in CHECKPOINT_FILES:
        if (run_dir / name).exists():
            os.link(run_dir / name, folder / name)
    if (run_dir / SHARDS).is_dir():
        shutil.copytree(run_dir / SHARDS, folder / SHARDS, copy_function=os.link)
    return folder


def restore(checkpoint: Any, run_dir: Path) -> bool:
    """Put a reported checkpoint back into the run folder; returns whether to resume. With none,
    what an earlier attempt of this trial left is cleared: it starts again from the beginning."""
    if checkpoint is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as source:
        if (Path(source) / SHARDS).is_dir():  # before last.pt, which names them
            shutil.copytree(Path(source) / SHARDS, run_dir / SHARDS, dirs_exist_ok=True)
        for name in CHECKPOINT_FILES:
            pending = run_dir / f".{name}.restored"
            shutil.copyfile(Path(source) / name, pending)
            promote(pending, run_dir / name)
    return True


def run_in_process(config: Config, job: TrialJob, resume: bool, report_fn) -> None:
    """One process's part of a trial (the trial itself, or one Ray Train worker). The last
    epoch is reported after the run's test evaluation, with the test metrics beside it: a
    scheduler ends a trial at its last report, which would otherwise cut off the test."""
    from dtrain.distributed import world
    from dtrain.train import train
    from dtrain.train.trackers import track_under_search

    track_under_search(Path(job.folder).name)
    history = saved_history(config.run_path / LAST) if resume else []
    last: list[Path] = []  # the checkpoint of the latest epoch
    final: list[dict] = []

    def report(metrics: dict) -> None:
        folder = _checkpoint_dir(last[-1]) if world()[0] == 0 else None  # the group is up
        try:
            report_fn(metrics, folder)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def on_epoch_end(record: dict, checkpoint: Path) -> None:
        history.append(record)
        last[:] = [checkpoint]
        metrics = _report_record(record, history, job)
        if record["epoch"] == config.train.epochs:
            final.append(metrics)
        else:
            report(metrics)

    summary = train(config, resume=resume, on_epoch_end=on_epoch_end)
    if final:
        for which in ("last", "best"):
            for name, value in (summary.get(f"test_{which}") or {}).items():
                if isinstance(value, int | float):
                    final[0][f"test_{which}_{name}"] = value
        report(final[0])


def saved_history(last: Path) -> list[dict]:
    """The epoch records a checkpoint holds: where a resumed trial's objective window starts."""
    import torch

    state = torch.load(last, weights_only=True, mmap=True)["state"]
    return json.loads(state["history"])


def _tune_report(metrics: dict, folder: Path | None) -> None:
    from ray import tune

    checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
    tune.report(metrics, checkpoint=checkpoint)


def _train_report(metrics: dict, folder: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


def _worker(loop_config: dict) -> None:
    """One Ray Train worker of a multi-process trial. Ray has set up the process group and
    RANK / WORLD_SIZE / LOCAL_RANK, which the engine reads as under torchrun; the run folder is
    shared, so rank 0 puts the checkpoint back while the others wait."""
    import ray.train
    import torch.distributed as dist

    job: TrialJob = loop_config["job"]
    run_dir = Path(loop_config["run_dir"])
    config = job.config(loop_config["values"], run_dir)
    checkpoint = ray.train.get_checkpoint()
    if ray.train.get_context().get_world_rank() == 0:
        restore(checkpoint, run_dir)
    dist.barrier()
    run_in_process(config, job, checkpoint is not None, _train_report)


def run_trial(values: dict[str, Any], job: TrialJob) -> None:
    """The Tune trainable: one trial, in one process or under a TorchTrainer."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(job.folder) / "trials" / trial_id
    config = job.config(values, run_dir)
    if job.workers == 1:
        resume = restore(tune.get_checkpoint(), run_dir)
        run_in_process(config, job, resume, _tune_report)
        return
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"values": values, "job": job, "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if job.gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpus > 0,
            resources_per_worker={"CPU": job.cpus, **({"GPU": job.gpus} if job.gpus else {})},
        ),
        run_config=RunConfig(
            name=trial_id,
            storage_path=str(Path(job.folder) / "train"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),  # Tune retries the whole trial
        ),
    )
    trainer.fit()
