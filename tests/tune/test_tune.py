"""`dtrain tune`: the search file checked before Ray starts, then real searches on a local Ray
cluster (each trial a real dtrain run): outputs, `--resume` after the driver is killed, a trial
that fails past its retries, and a 2-worker trial under Ray Train equal to the same run under
torchrun. (A trial killed -9 and retried: tests/faults.)"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    REPO,
    copy_dataset,
    rewrite_shard,
    small_overrides,
    stripes_dataset,
)
from ray_search import epoch_lines, epoch_records, run, tune_command, write_search

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.tune.search_outputs import pick_best
from dtrain.tune.space import parse_space
from dtrain.tune.trial import objective

pytest.importorskip("ray.tune", reason="the tune extra (pip install -e .[tune]) is not installed")

ROOT = REPO
BIN = Path(sys.executable).parent


# -- the search file, before any work -------------------------------------------------------------


def test_group_sizes_that_do_not_divide_the_batch_are_dropped(capsys):
    base = load_config(None, ["method.name=iam", "data.batch_size=24"])
    (dim,) = parse_space({"method.group_size": {"choice": [2, 4, 8, 16]}}, base, "s.yaml")
    assert dim.values == (2, 4, 8)
    assert "[16] dropped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "space, message",
    [
        ({"method.temprature": {"uniform": [0.1, 1]}}, "did you mean method.temperature"),
        ({"method.temperature": {"loguniform": [0, 1]}}, "low > 0"),
        ({"method.temperature": {"uniform": [1, 0.1]}}, "low < high"),
        ({"method.temperature": {"choice": [0.5, -1]}}, "choice -1"),
        ({"method.temperature": [0.1, 0.5]}, "must be one of {choice"),
        ({"method.group_size": {"choice": [3, 5]}}, "no value left"),
        ({"optim.name": {"choice": ["sgd", "lion"]}}, "'lion'"),
    ],
)
def test_a_bad_search_space_is_refused_with_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(space, load_config(None, ["method.name=iam", "data.batch_size=16"]), "s.yaml")


def test_grid_values_of_a_log_range_are_log_spaced():
    (dim,) = parse_space({"method.mixup_alpha": {"loguniform": [0.1, 10.0]}}, load_config(), "s")
    assert dim.grid(3) == pytest.approx([0.1, 1.0, 10.0])


def test_objective_averages_the_last_epochs():
    history = [{"val_accuracy": v} for v in (0.2, 0.9, 0.5, 0.6, 0.7)]
    assert objective(history, "val_accuracy", 3) == pytest.approx(0.6)
    assert objective(history[:1], "val_accuracy", 3) == pytest.approx(0.2)
    assert math.isnan(objective([], "val_accuracy", 3))


def test_the_best_trial_is_one_that_ran_every_epoch():
    trials = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["stopped", "done", "done", "failed"],
            "objective": [0.9, 0.6, 0.7, math.nan],
        }
    )
    assert pick_best(trials, "max")["trial_id"] == "c"
    assert pick_best(trials, "min")["trial_id"] == "b"


def test_an_unknown_objective_metric_is_refused_with_a_suggestion():
    from dtrain.tune.settings import SearchSettings

    with pytest.raises(ConfigError, match="did you mean val_accuracy"):
        SearchSettings(metric="val_acuracy").validate()


@pytest.mark.parametrize(
    "metric, mode, expected",
    [
        ("val_accuracy", None, "max"),
        ("val_ece", None, "min"),
        ("val_ema_ece", None, "min"),
        ("train_loss", None, "min"),
        ("val_ema_accuracy", None, "max"),  # what an EMA rule hands the user
        ("val_ema_clean_balanced_accuracy", None, "max"),
        ("val_ece", "max", "max"),  # the user's word wins
    ],
)
def test_the_objective_mode_follows_the_metric(metric, mode, expected):
    from dtrain.tune.settings import SearchSettings

    settings = SearchSettings(metric=metric, **({"mode": mode} if mode else {}))
    settings.validate()
    assert settings.mode == expected


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"train.epochs": {"randint": [1, 4]}}, 3),  # randint's upper bound is exclusive
        ({"train.epochs": {"choice": [2, 3]}}, 3),  # not the base config's 5: no trial runs it
        ({"method.temperature": {"choice": [0.5]}}, 5),
    ],
)
def test_the_most_epochs_a_trial_runs(tiny, tmp_path, space, expected):
    from dtrain.tune.settings import load_search, max_epochs_of

    path = write_search(tmp_path / "s.yaml", space)
    search = load_search(path, None, [f"data.path={tiny}", "train.epochs=5"], {})
    assert max_epochs_of(search) == expected


def test_the_search_files_config_is_the_base_unless_config_is_given(tiny, tmp_path):
    """tuning/iam_search.yaml searches the mixup's knobs: its base is the method's preset, not
    the default (which has no mixup), and --config still wins."""
    from dtrain.tune.settings import load_search

    shipped = ROOT / "tuning" / "iam_search.yaml"
    assert load_search(shipped, None, [f"data.path={tiny}"], {}).base.method.name == "iam"
    ce = str(ROOT / "configs" / "ce.yaml")
    assert load_search(shipped, ce, [f"data.path={tiny}"], {}).base.method.name == "ce"
    path = tmp_path / "s.yaml"
    path.write_text("config: nowhere.yaml\nspace:\n  method.temperature: {choice: [0.5]}\n")
    with pytest.raises(ConfigError, match="config: nowhere.yaml is not a file"):
        load_search(path, None, [f"data.path={tiny}"], {})


def test_asha_grace_is_cut_to_the_epochs_before_ray_starts(tiny, tmp_path, capsys):
    """Ray's ASHA asserts grace_period <= max_t: one epoch under the default grace of 2."""
    from dtrain.tune.settings import load_search

    path = write_search(tmp_path / "s.yaml", {"method.temperature": {"choice": [0.5]}})
    search = load_search(path, None, [f"data.path={tiny}", "train.epochs=1"], {})
    assert search.settings.grace_period == 1
    assert "search.grace_period=2 cut to the 1 epoch(s)" in capsys.readouterr().out
    search = load_search(path, None, [f"data.path={tiny}", "train.epochs=3"], {})
    assert search.settings.grace_period == 2


def test_a_reported_checkpoint_comes_back_with_its_deepspeed_shards(tmp_path):
    from ray.tune import Checkpoint

    from dtrain.tune.trial import _checkpoint_dir, restore

    run_dir = tmp_path / "run"
    (run_dir / "deepspeed" / "step3").mkdir(parents=True)
    files = {"last.pt": b"weights", "config.yaml": b"a: 1", "deepspeed/step3/rank0.pt": b"shard"}
    for name, content in files.items():
        (run_dir / name).write_bytes(content)
    folder = _checkpoint_dir(run_dir / "last.pt")
    other = tmp_path / "elsewhere"
    assert restore(Checkpoint.from_directory(str(folder)), other) is True
    for name, content in files.items():
        assert (other / name).read_bytes() == content, name
    assert restore(None, other) is False and not other.exists()  # no checkpoint: from scratch


def test_a_searched_method_brings_its_implied_values():
    from dtrain.tune.trial import TrialJob

    base = load_config(None, ["method.temperature=0.3"])
    job = TrialJob(base.to_dict(), set(base.explicit_keys), "search", "val_accuracy", 3, 1, 1, 0)
    afm = job.config({"method.name": "afm"}, Path("run"))
    assert afm.model.attention_inputs == "feature"  # AFM's own, as `method.name=afm` gives
    assert afm.method.temperature == 0.3 and afm.train.run_dir == "run"
    assert job.config({"method.name": "iam"}, Path("run")).model.attention_inputs != "feature"


@pytest.mark.parametrize(
    "text, message",
    [
        ("space: [unclosed", "search file .*s.yaml is not valid YAML"),
        ("- a list", "must hold a mapping"),
        ("space: {}\nsearhc: {}", "only `space:`, `search:` and `config:`"),
        ("space: {}", "`space:` must map config keys"),
    ],
)
def test_a_broken_search_file_is_refused_naming_the_file(tmp_path, text, message):
    from dtrain.tune.settings import load_search

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_search(tmp_path / "s.yaml", None, [], {})


def test_overrides_after_flags_reach_the_base_config(tmp_path, capsys):
    from dtrain.commands.main import main

    search = write_search(tmp_path / "s.yaml", {"method.temperature": {"choice": [0.5]}})
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(search), "--config", "configs/iam.yaml", f"data.path={tmp_path}/none"])
    assert exit_info.value.code == 2
    assert f"data.path={tmp_path}/none holds no dataset.json" in capsys.readouterr().err


def test_a_search_folder_is_never_reused_by_another_search(tiny, tmp_path, capsys):
    from dtrain.errors import RunFolderError
    from dtrain.tune.search import _check_folder
    from dtrain.tune.settings import load_search

    def load(space: dict):
        path = write_search(tmp_path / "s.yaml", space)
        return load_search(path, None, [f"data.path={tiny}"], {"storage_path": str(tmp_path)})

    first = load({"method.temperature": {"choice": [0.5]}})
    with pytest.raises(RunFolderError, match="holds no search to resume"):
        _check_folder(first, resume=True)
    _check_folder(first, resume=False)
    assert (first.folder / "search.yaml").is_file()
    with pytest.raises(RunFolderError, match="already holds a search"):
        _check_folder(first, resume=False)
    _check_folder(first, resume=True)  # the same search continues
    assert "ignored" not in capsys.readouterr().out
    first.settings.max_concurrent = 5
    _check_folder(first, resume=True)
    assert "ignored: max_concurrent" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="the space differs"):
        _check_folder(load({"method.temperature": {"choice": [0.7]}}), resume=True)


# -- real searches --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("tune"), 48, shard_size=16)


def test_trials_get_local_paths_absolute(tiny, tmp_path, monkeypatch):
    """Trials run in Ray's own folders: a relative path would name nothing there."""
    from dtrain.tune.settings import _absolute_paths

    monkeypatch.chdir(tmp_path)
    Path("weights.pth").write_bytes(b"")
    config = load_config(None, [f"data.path={tiny}", "model.pretrained=weights.pth"])
    _absolute_paths(config)
    assert config.model.pretrained == str(tmp_path / "weights.pth")
    assert config.data.path == str(tiny.resolve())


@pytest.fixture
def env(ray_env) -> dict:
    return ray_env


@pytest.mark.ray
def test_asha_search_writes_tables_plots_and_a_best_config(tiny, tmp_path, env):
    """Each trial's status, epochs and objective are derived here from its own run folder, and
    the chosen trial must hold the best objective of the finished ones. The objective is the
    val ECE, which is minimised without being told; train.epochs is searched too (a trial that
    ran its own epochs is done, whatever the others run; randint's upper bound is exclusive)."""
    space = {
        "method.group_size": {"choice": [2, 4, 8]},
        "method.temperature": {"loguniform": [0.05, 1.0]},
        "train.epochs": {"randint": [1, 3]},
    }
    search = write_search(
        tmp_path / "search.yaml",
        space,
        num_samples=4,
        max_concurrent=2,
        grace_period=1,
        metric="val_ece",
        window=2,
    )
    result = run(tune_command(search, tiny, tmp_path / "results"), env)
    folder = tmp_path / "results" / "search"
    trials = pd.read_parquet(folder / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert len(trials) == 4
    assert set(trials["train.epochs"]) == {1, 2}  # both values the sampler can give (seed 0)
    for trial_id, trial in trials.iterrows():
        run_dir = folder / "trials" / trial_id
        history = [json.loads(line) for line in epoch_lines(run_dir)]
        ran = [r["epoch"] for r in history]
        own = int(trial["train.epochs"])
        assert ran == list(range(1, len(ran) + 1)) and 1 <= len(ran) <= own, (trial_id, ran)
        status = "done" if len(ran) == own else "stopped"
        assert (trial["status"], trial["epochs"]) == (status, len(ran)), trial_id
        line = "done" if status == "done" else "stopped early"
        assert f"tune: trial {trial_id} {line} after {len(ran)} epoch(s)" in result.stdout
        ece = [r["val_ece"] for r in history[-2:]]
        assert trial["objective"] == pytest.approx(sum(ece) / len(ece)), trial_id
        if status == "done":
            assert 0 <= trial["test_clean_accuracy_last"] <= 1  # the trial's own test
    done = trials[trials["status"] == "done"]
    assert len(done)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best"]["trial_id"] == done["objective"].idxmin()  # ECE: lower is better
    assert summary["stopped_early"] == int((trials["status"] == "stopped").sum())
    assert len(epochs) == trials["epochs"].sum()
    assert {"objective", "val_ece", "val_accuracy", "val_clean_accuracy"} <= set(epochs.columns)
    assert (folder / "trials.csv").is_file() and (folder / "epochs.csv").is_file()
    for plot in ("objective_vs_params.png", "learning_curves.png"):
        assert (folder / plot).stat().st_size > 10_000
    # never more than 2 trials at once: their [start, end] spans, from Ray's own timestamps
    spans = [
        (part["timestamp"].min() - part["time_this_iter_s"].iloc[0], part["timestamp"].max())
        for _, part in epochs.groupby("trial_id")
    ]
    for start, _ in spans:
        running = sum(s <= start + 0.5 and start + 0.5 < e for s, e in spans)
        assert running <= 2, spans
    best = trials.loc[summary["best"]["trial_id"]]
    best_config = yaml.safe_load((folder / "best.yaml").read_text())
    assert best_config["method"]["temperature"] == pytest.approx(best["method.temperature"])
    assert best_config["train"]["run_dir"] == ""
    # `dtrain train --config best.yaml` takes it unchanged (here for one epoch)
    run_dir = tmp_path / "from_best"
    run(
        [
            str(BIN / "dtrain"),
            "train",
            "--config",
            str(folder / "best.yaml"),
            "train.epochs=1",
            f"train.run_dir={run_dir}",
            "train.progress=false",
        ],
        env,
    )
    assert epoch_records(run_dir) == [1]


@pytest.mark.ray
def test_resume_after_the_driver_is_killed_skips_the_finished_trial(tiny, tmp_path, env):
    search = write_search(
        tmp_path / "search.yaml",
        {"method.temperature": {"choice": [0.3, 0.6]}},
        algorithm="grid",
        scheduler="none",
        max_concurrent=1,
    )
    command = tune_command(search, tiny, tmp_path / "results")
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while "(1 finished" not in (tmp_path / "first.log").read_text():
        assert driver.poll() is None and time.monotonic() < deadline, (
            tmp_path / "first.log"
        ).read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(3)  # Tune snapshots the search's state every second
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    folder = tmp_path / "results" / "search"
    (first,) = [d for d in (folder / "trials").iterdir() if (d / "summary.json").is_file()]
    finished_at = (first / "summary.json").stat().st_mtime_ns
    result = run([*command, "--resume"], env)
    assert f"trial {first.name} done" not in result.stdout  # not run again
    assert (first / "summary.json").stat().st_mtime_ns == finished_at
    trials = pd.read_parquet(folder / "trials.parquet")
    assert list(trials["status"]) == ["done", "done"]
    for run_dir in (folder / "trials").iterdir():
        assert epoch_records(run_dir) == [1, 2]


@pytest.mark.ray
def test_a_trial_failing_past_its_retries_is_recorded_and_the_search_goes_on(tiny, tmp_path, env):
    """data.strict=true fails on the broken sample (every attempt); the other trial runs."""
    data = copy_dataset(tiny, tmp_path / "data")
    victim = []

    def corrupt(sample: dict) -> dict:
        if not victim:
            victim.append(sample["__key__"])
            sample["png"] = sample["png"][:40]  # a truncated image
        return sample

    rewrite_shard(sorted(data.glob("train-*.tar"))[0], corrupt)
    search = write_search(
        tmp_path / "search.yaml",
        {"data.strict": {"choice": [True, False]}},
        algorithm="grid",
        scheduler="none",
        max_failures=0,
    )
    result = run(tune_command(search, data, tmp_path / "results", "train.epochs=1"), env)
    assert "FAILED" in result.stdout
    trials = pd.read_parquet(tmp_path / "results" / "search" / "trials.parquet")
    status = dict(zip(trials["data.strict"], trials["status"], strict=True))
    assert status == {True: "failed", False: "done"}
    failed = trials[trials["status"] == "failed"].iloc[0]
    assert failed["error"]
    best = yaml.safe_load((tmp_path / "results" / "search" / "best.yaml").read_text())
    assert best["data"]["strict"] is False


@pytest.mark.ray
def test_a_two_worker_trial_equals_the_same_run_under_torchrun(tiny, tmp_path, env):
    search = write_search(
        tmp_path / "search.yaml",
        {"method.temperature": {"choice": [0.5]}},
        scheduler="none",
        num_samples=1,
    )
    run(
        tune_command(
            search, tiny, tmp_path / "results", "--workers-per-trial=2", "--cpus-per-trial=0.9"
        ),
        env,
    )
    (trial_dir,) = (tmp_path / "results" / "search" / "trials").iterdir()
    torchrun_dir = tmp_path / "torchrun"
    overrides = small_overrides(tiny, torchrun_dir, 16, "method.temperature=0.5")
    run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dtrain",
            "train",
            *overrides,
        ],
        env,
    )
    trial = torch.load(trial_dir / "last.pt", weights_only=True)
    assert len(trial["rng"]) == 2  # one RNG state per process: it ran in 2
    ours = trial["model"]
    theirs = torch.load(torchrun_dir / "last.pt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.ray
def test_tpe_search_on_a_ray_cluster_started_beforehand(tiny, tmp_path, env):
    """`ray start --head` as on a cluster's first node, then `dtrain tune --address`."""
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={address.split(':')[1]}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--object-store-memory=100000000",
    ]
    env = {**env, "RAY_AUTH_MODE": "disabled"}
    run(head, env)  # stopped by the `env` fixture (`ray stop` would stop every Ray here)
    search = write_search(
        tmp_path / "search.yaml",
        {"method.temperature": {"loguniform": [0.05, 1.0]}},
        algorithm="tpe",
        num_samples=2,
        scheduler="none",
    )
    command = tune_command(
        search, tiny, tmp_path / "results", "train.epochs=1", f"--address={address}"
    )
    result = run(command, env)
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    trials = pd.read_parquet(tmp_path / "results" / "search" / "trials.parquet")
    assert list(trials["status"]) == ["done", "done"]
    assert trials["method.temperature"].between(0.05, 1.0).all()
    assert trials["method.temperature"].nunique() == 2
