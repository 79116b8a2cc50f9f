"""`train.trackers` against real back ends: a local MLflow tracking server (sqlite store, local
artifact root) read back through MlflowClient, and W&B in offline mode read back from its run
file; a kill and `--resume` continue the same tracked run with each step once."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import PROCS, REPO, free_port, small_overrides, stripes_dataset

from dtrain.config import load_config
from dtrain.errors import ConfigError
from dtrain.train import train
from dtrain.train.trackers import flatten, metric_values

ROOT = REPO
HURT = PROCS / "hurt.py"
ARTIFACTS = {"curves.png", "summary.json", "label_scores.parquet", "model.safetensors"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("track"), 160, shard_size=16)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on localhost: its URI."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{root / 'store.db'}"),
            *("--default-artifact-root", str(root / "artifacts"), "--no-serve-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not come up"
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(30)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers should hold it: by name, (step or epoch, value)."""
    history = defaultdict(list)
    for record in records(run_dir):
        for name, value in metric_values(record).items():
            history[name].append((int(record[record["kind"]]), value))
    return history


def wandb_log_records(path: Path) -> list[bytes]:
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of checksummed
    chunks) after a 7-byte `:W&B` header, as wandb writes it."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or kind == 0:  # a block's zero padding
            pos += room
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(parts)
            parts = b""
    return records


def mlflow_history(client, run_id: str, names) -> dict[str, list[tuple[int, float]]]:
    return {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        for name in names
    }


def the_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_an_unknown_tracker_is_refused_with_the_nearest_name(tmp_path):
    with pytest.raises(ConfigError, match="did you mean mlflow"):
        load_config(None, ["train.trackers=tensorboard,mlfow"])
    assert load_config(None, ["train.trackers=[mlflow, wandb]"]).train.trackers == [
        "mlflow",
        "wandb",
    ]
    assert load_config(None, []).train.trackers == ["tensorboard"]


def test_a_tracker_whose_client_is_missing_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an import finds when it is absent
    with pytest.raises(ConfigError, match=r"needs the wandb client.*pip install 'dtrain\[track\]'"):
        load_config(None, ["train.trackers=[tensorboard,wandb]"]).validate()


@pytest.mark.multiproc
def test_in_two_processes_only_rank_0_logs(tiny, tmp_path, mlflow_server, cpu_env):
    """One tracked run for a 2-process job, holding rank 0's metrics.jsonl once."""
    from mlflow import MlflowClient

    env = {**cpu_env, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "ranks"}
    run_dir = tmp_path / "ranks"
    args = small_overrides(tiny, run_dir, 8, "train.epochs=1", "train.trackers=[mlflow]")
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dtrain",
            "train",
            *args,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    run = the_run(client, "ranks")  # a second rank logging would start a second run
    expected = expected_history(run_dir)
    assert mlflow_history(client, run.info.run_id, expected) == expected


@pytest.mark.slow
def test_mlflow_run_holds_the_config_the_metrics_and_the_artifacts(
    tiny, tmp_path, mlflow_server, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "two-epochs")
    run_dir = tmp_path / "run"
    config = load_config(None, small_overrides(tiny, run_dir, 16, "train.trackers=[mlflow]"))
    summary = train(config)
    assert not (run_dir / "tensorboard").exists()  # only what was asked for
    client = MlflowClient(mlflow_server)
    run = the_run(client, "two-epochs")
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten(config.to_dict()).items()}
    expected = expected_history(run_dir)
    assert {"step/loss", "epoch/train_loss", "epoch/val_accuracy"} <= set(expected)
    assert mlflow_history(client, run.info.run_id, expected) == expected
    test_metrics = run.data.metrics
    assert test_metrics["test_best/accuracy"] == summary["test_best"]["accuracy"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert ARTIFACTS | {"selection.txt"} <= logged


@pytest.mark.multiproc
def test_a_killed_and_resumed_run_continues_its_mlflow_run_with_each_step_once(
    tiny, tmp_path, mlflow_server, cpu_env
):
    from mlflow import MlflowClient

    env = {**cpu_env, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "killed"}
    run_dir = tmp_path / "killed"
    args = small_overrides(
        tiny,
        run_dir,
        16,
        "train.log_every=2",
        "train.checkpoint_every_steps=4",
        "train.trackers=[mlflow]",
    )
    # step 21 of 28: mid-epoch 2, after the checkpoint at step 18 and the log of step 20
    killed = subprocess.run(
        [sys.executable, str(HURT), "step", "21", "--", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert max(r["step"] for r in records(run_dir) if r["kind"] == "step") == 20
    resumed = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", "--resume", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    run = the_run(client, "killed")  # the same run, not a second one
    expected = expected_history(run_dir)
    steps = [s for s, _ in expected["step/loss"]]
    assert steps == list(range(2, 29, 2))  # metrics.jsonl itself: each step once
    assert mlflow_history(client, run.info.run_id, expected) == expected


@pytest.mark.slow
def test_wandb_offline_run_file_holds_the_metric_history(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    config = load_config(None, small_overrides(tiny, run_dir, 16, "train.trackers=[wandb]"))
    train(config)
    wandb.teardown()  # the service writes the run file; a loaded machine may still be writing it
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    kinds, history = [], defaultdict(list)
    for data in wandb_log_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kinds.append(record.WhichOneof("record_type"))
        if kinds[-1] != "history":
            continue
        row = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        for kind in ("step", "epoch"):
            if f"{kind}/{kind}" in row:
                where = int(row[f"{kind}/{kind}"])
                for name, value in row.items():
                    if name.startswith(f"{kind}/") and name != f"{kind}/{kind}":
                        history[name].append((where, value))
    assert "exit" in kinds, f"the run file ends before its exit record: {Counter(kinds)}"
    assert dict(history) == expected_history(run_dir)


@pytest.mark.ray
def test_a_search_logs_each_trial_under_one_experiment_with_the_best_tagged(
    tiny, tmp_path, mlflow_server, ray_env
):
    pytest.importorskip("ray.tune")
    from mlflow import MlflowClient
    from ray_search import run as run_search
    from ray_search import tune_command, write_search

    search = write_search(
        tmp_path / "s.yaml",
        {"method.temperature": {"choice": [0.3, 0.7]}},
        algorithm="grid",
        scheduler="none",
    )
    command = tune_command(
        search,
        tiny,
        tmp_path / "results",
        "train.epochs=1",
        "train.trackers=[mlflow]",
        "--name=tracked-search",
    )
    run_search(command, {**ray_env, "MLFLOW_TRACKING_URI": mlflow_server})
    best = json.loads((tmp_path / "results" / "tracked-search" / "summary.json").read_text())
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracked-search")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        p.name for p in (tmp_path / "results" / "tracked-search" / "trials").iterdir()
    )
    tagged = [r.info.run_name for r in runs if r.data.tags.get("dtrain.best_trial") == "true"]
    assert tagged == [best["best"]["trial_id"]]


@pytest.mark.slow
def test_each_cleanup_round_is_a_run_nested_under_the_main_run(
    tiny, tmp_path, mlflow_server, monkeypatch
):
    from mlflow import MlflowClient

    from dtrain.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rounds")
    run_dir = tmp_path / "run"
    overrides = ["train.trackers=[mlflow]", "train.refine_rounds=1", "train.epochs=1"]
    train(load_config(None, small_overrides(tiny, run_dir, 16, *overrides)))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("rounds").experiment_id])
    (main,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    rounds = [r for r in runs if r is not main]
    assert len(rounds) == 2  # round 0 in rounds/0, the final round in the run folder
    assert {r.data.tags["mlflow.parentRunId"] for r in rounds} == {main.info.run_id}
    for folder, tracked in ((run_dir / "rounds" / "0", "0"), (run_dir, "run")):
        (run,) = [r for r in rounds if r.info.run_name == tracked]
        assert mlflow_history(client, run.info.run_id, expected_history(folder)) == (
            expected_history(folder)
        )
