"""A Ray Tune search over dtrain's config: the sampler, ASHA, a local or joined Ray cluster,
retries and `--resume`, and one progress line per finished trial."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import yaml

from dtrain.errors import ConfigError, RunFolderError
from dtrain.files import write_atomic
from dtrain.ray_cluster import start_ray
from dtrain.tune.settings import Search, epochs_of, max_epochs_of
from dtrain.tune.trial import OBJECTIVE, TrialJob, run_trial

SAVED = "search.yaml"


def _search_alg(search: Search):
    s = search.settings
    if s.algorithm == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)


def _scheduler(search: Search):
    s = search.settings
    if s.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs_of(search),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def param_space(search: Search) -> dict:
    points = search.settings.grid_points if search.settings.algorithm == "grid" else None
    return {d.key: d.to_ray(points) for d in search.space}


def _job(search: Search) -> TrialJob:
    s = search.settings
    return TrialJob(
        base=search.base.to_dict(),
        explicit_keys=set(search.base.explicit_keys),
        folder=str(search.folder),
        metric=s.metric,
        window=s.window,
        workers=s.workers_per_trial,
        cpus=s.cpus_per_trial,
        gpus=s.gpus_per_trial,
    )


def _trainable(search: Search):
    from ray import tune

    s = search.settings
    trainable = tune.with_parameters(run_trial, job=_job(search))
    if s.workers_per_trial == 1:
        resources = {"CPU": s.cpus_per_trial, "GPU": s.gpus_per_trial}
    else:  # the trial only drives its TorchTrainer, whose workers hold the resources
        resources = {"CPU": 0.01}
    return tune.with_resources(trainable, resources)


def _progress_callback(base_epochs: int):
    from ray.tune import Callback

    class ProgressLine(Callback):
        """One line per finished (or failed) trial."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.done = 0

        def _line(self, trial, status: str) -> None:
            self.done += 1
            result = trial.last_result or {}
            values = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
            print(
                f"tune: trial {trial.trial_id} {status} after {result.get('epoch', 0)} epoch(s), "
                f"objective {_short(result.get(OBJECTIVE, math.nan))}  [{values}]  "
                f"({self.done} finished, {time.monotonic() - self.started:.0f} s)",
                flush=True,
            )

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            epochs = (trial.last_result or {}).get("epoch", 0)
            finished = epochs >= epochs_of(base_epochs, trial.config)
            self._line(trial, "done" if finished else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "FAILED")

    return ProgressLine()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _check_folder(search: Search, resume: bool) -> None:
    """A new search never writes into an old one; `--resume` continues only the same search."""
    saved = search.folder / SAVED
    if resume:
        if not saved.is_file():
            raise RunFolderError(f"{search.folder} holds no search to resume ({SAVED} missing)")
        before = yaml.safe_load(saved.read_text())
        now = yaml.safe_load(yaml.safe_dump(search.to_dict()))
        for part in ("space", "base"):
            if before[part] != now[part]:
                raise ConfigError(
                    f"--resume: the {part} differs from the one {search.folder} was started "
                    f"with ({saved}); resume with the same file and overrides"
                )
        changed = sorted(k for k, v in now["search"].items() if before["search"].get(k) != v)
        if changed:  # Tune restores the search as it was started
            print(f"tune: --resume keeps the search's own settings; ignored: {', '.join(changed)}")
        return
    if saved.exists():
        raise RunFolderError(
            f"{search.folder} already holds a search; pass --resume to continue it or "
            "--name to start another"
        )
    search.folder.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, yaml.safe_dump(search.to_dict(), sort_keys=False))


def run_search(search: Search, resume: bool = False):
    """Run (or continue) the search; returns Ray's ResultGrid."""
    from ray import tune

    s = search.settings
    _check_folder(search, resume)
    # Tune saves the search's own state at least this often (seconds), so a search killed
    # right after a trial finished does not run it again on --resume
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(s.address, s.object_store_mb)
    trainable = _trainable(search)
    if resume:
        tuner = tune.Tuner.restore(
            str(search.folder), trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode=s.mode,
            search_alg=_search_alg(search),
            scheduler=_scheduler(search),
            num_samples=s.num_samples,
            # a Searcher (TPE) takes the limit here; the basic generator holds its own
            max_concurrent_trials=s.max_concurrent if s.algorithm == "tpe" else None,
        ),
        run_config=tune.RunConfig(
            name=s.name,
            storage_path=str(Path(s.storage_path).resolve()),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_progress_callback(search.base.train.epochs)],
            # each trial's console output: stdout and stderr in Ray's trial folder
            log_to_file=True,
            sync_config=tune.SyncConfig(sync_artifacts=True),
            verbose=0,
        ),
    )
    return tuner.fit()
