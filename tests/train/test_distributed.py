"""Multi-process training on the CPU with real launchers and real process groups (gloo):
torchrun, accelerate launch, a DeepSpeed engine (ZeRO-2 and ZeRO-3) and two torchrun "nodes"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import PROCS, REPO, free_port, small_overrides, stripes_dataset

from dtrain.launch.slurm_env import env_from_slurm

ROOT = REPO
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """128 stripe images in shards of 8, so that every split feeds 2 ranks."""
    return stripes_dataset(tmp_path_factory.mktemp("dist"), 64, shard_size=8)


@pytest.fixture(scope="module")
def env(cpu_env) -> dict:
    return cpu_env


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "dtrain", "train", *small_overrides(data, run_dir, 8, *extra)]


def run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torchrun(nproc: int, *args: str) -> list[str]:
    """Single-node torchrun; --standalone picks its own free port (no race with other tests)."""
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *args]


def test_srun_variables_become_torch_variables(monkeypatch):
    fake = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "localhost",  # no NodeAddr outside a cluster: the name resolved
    }
    monkeypatch.setattr(os, "environ", dict(fake))  # never touch the real environment
    assert env_from_slurm()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == [
        "3",
        "8",
        "1",
        "127.0.0.1",
    ]
    assert os.environ["MASTER_PORT"] == "28544"  # slurm_env.job_port: below 32768
    monkeypatch.setattr(os, "environ", {**fake, "RANK": "5"})  # a launcher's variables win
    assert not env_from_slurm()
    assert os.environ["RANK"] == "5" and "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("method", ["ce", "iam"])
@pytest.mark.multiproc
def test_two_processes_equal_one_on_the_same_global_batch(method, padding, tmp_path, env):
    """DDP gradient averaging, for iam the contrastive loss over the global batch, and with
    padding (rank 0: 8 real samples, rank 1: 3) the weighting by the global valid count."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    script = str(PROCS / "dist_equivalence.py")
    run([sys.executable, script, method, str(one), f"--padding={padding}"], env)
    run(torchrun(2, script, method, str(two), f"--padding={padding}"), env)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("deepspeed", ["", "zero1.json"])
@pytest.mark.multiproc
def test_gradient_accumulation_equals_the_whole_batch(deepspeed, tmp_path, env):
    """Two micro-batches of 8 accumulated equal one batch of 16 (CE, fp64), on both engines;
    under DeepSpeed in 2 processes (2 x 2 micro-batches of 4)."""
    script = str(PROCS / "dist_equivalence.py")
    whole, accumulated = tmp_path / "whole.pt", tmp_path / "accumulated.pt"
    run([sys.executable, script, "ce", str(whole)], env)
    extra = [f"--deepspeed={ROOT / 'configs' / 'deepspeed' / deepspeed}"] if deepspeed else []
    command = [script, "ce", str(accumulated), "--accum=2", *extra]
    run(torchrun(2, *command) if deepspeed else [sys.executable, *command], env)
    a, b = torch.load(whole, weights_only=True), torch.load(accumulated, weights_only=True)
    for name, tensor in a.items():
        torch.testing.assert_close(b[name].to(tensor.dtype), tensor, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.multiproc
def test_accelerate_launch_with_a_config_file(tiny, tmp_path, env):
    """A GPU cluster's usual config (MULTI_GPU, torch elastic underneath); with no GPU the
    trainer runs each process on the CPU over gloo. (Accelerate's MULTI_CPU type would need
    mpirun.) With a label clean-up round, whose second training reuses the first's engine: every
    rank, not only rank 0, trains round 1 on round 0's corrections (each rank writes the labels
    it trained with, tests/train/test_train_rank_labels.py)."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
        f"num_processes: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
        f"main_process_port: {free_port()}\nmixed_precision: 'no'\nuse_cpu: false\n"
        "gpu_ids: all\n"
    )
    run_dir, seen = tmp_path / "run", tmp_path / "seen"
    seen.mkdir()
    overrides = small_overrides(
        tiny, run_dir, 8, "train.epochs=1", "method.name=ce", "train.refine_rounds=1"
    )
    result = run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(config),
            str(PROCS / "rank_labels.py"),
            str(seen),
            *overrides,
        ],
        env,
    )
    assert "2 process(es)" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert summary["test_last"]["samples"] == 26  # every test image once, over both ranks
    # a clean-up round on the same engine: round 1 trained on round 0's corrections
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert (run_dir / "rounds" / "0" / "corrections.parquet").is_file()
    assert summary["rounds"][1]["labels_corrected_before"] == summary["rounds"][0]["corrections"]
    corrections = {
        row["key"]: row["new"]
        for row in pq.read_table(run_dir / "rounds" / "0" / "corrections.parquet").to_pylist()
    }
    assert corrections
    ranks = [json.loads((seen / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, rounds in enumerate(ranks):
        assert [r["relabel"] for r in rounds] == [{}, corrections], rank
        corrected = corrections.keys() & rounds[1]["seen"].keys()
        assert corrected, rank  # each rank's share holds corrected samples
        assert {k: rounds[1]["seen"][k] for k in corrected} == {
            k: corrections[k] for k in corrected
        }, rank
    assert not ranks[0][1]["seen"].keys() & ranks[1][1]["seen"].keys()  # each its own share


def deepspeed_launcher(nproc: int, *args: str) -> list[str]:
    """The `deepspeed` launcher; it passes --local_rank=N to the module, which dtrain accepts."""
    assert args[0] == "-m"
    return [
        str(BIN / "deepspeed"),
        f"--num_gpus={nproc}",
        f"--master_port={free_port()}",
        "--module",
        *args[1:],
    ]


@pytest.mark.multiproc
def test_deepspeed_zero3_trains_checkpoints_resumes_and_finishes(tiny, tmp_path, env):
    """Under the `deepspeed` launcher. (ZeRO-2 under torchrun, killed -9 and resumed to the
    uninterrupted weights: tests/faults/test_kill.py.)"""
    launcher = deepspeed_launcher
    run_dir = tmp_path / "run"
    args = train_args(
        tiny, run_dir, f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}"
    )
    first = run(launcher(2, *args, "train.stop_after_steps=3"), env)
    assert "stopped after batch 3 of 6 in epoch 1;" in first.stdout
    assert "2 process(es)" in first.stdout
    assert (run_dir / "deepspeed" / "step3").is_dir()
    second = run(launcher(2, args[0], args[1], args[2], "--resume", *args[3:]), env)
    assert "epoch   2" in second.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test_last"]["samples"] == 26
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["state"]["epoch"] == 2
    assert state["model"]  # consolidated weights, readable without DeepSpeed
    tags = [p.name for p in (run_dir / "deepspeed").iterdir() if p.is_dir()]
    assert tags == [state["deepspeed_tag"]]  # older shards removed once last.pt moved on
    evaluated = run(
        [
            sys.executable,
            "-m",
            "dtrain",
            "eval",
            str(run_dir),
            "--checkpoint",
            "last",
        ],
        env,
    )
    assert json.loads(evaluated.stdout[evaluated.stdout.index("{") :])["samples"] == 26


@pytest.mark.multiproc
def test_deepspeed_config_in_the_usual_style_runs_its_own_optimizer(tiny, tmp_path, env):
    """An `optimizer` section and an explicit gradient_clipping, as DeepSpeed users write them:
    DeepSpeed's AdamW runs, and its values replace the dtrain defaults the user never set."""
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_clipping": 1.0,
                # torch_adam: torch's AdamW inside DeepSpeed, no fused op to compile on a CPU
                "optimizer": {
                    "type": "AdamW",
                    "params": {"lr": 0.001, "weight_decay": 0.01, "torch_adam": True},
                },
                "zero_optimization": {"stage": 2},
            }
        )
    )
    run_dir = tmp_path / "run"
    args = train_args(tiny, run_dir, "train.epochs=1", "method.name=ce", f"train.deepspeed={ds}")
    result = run(torchrun(2, *args), env)
    assert "engine: optimizer: DeepSpeed's AdamW" in result.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert (saved["name"], saved["lr"], saved["grad_clip"]) == ("adamw", 0.001, 1.0)
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


@pytest.mark.multiproc
def test_two_nodes_as_two_torchrun_invocations(tiny, tmp_path, env):
    port = free_port()
    run_dir = tmp_path / "run"
    nodes = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *train_args(tiny, run_dir, "train.epochs=1", "method.name=iam"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-2000:] + err[-2000:]
    assert "2 process(es)" in outputs[0][0]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


@pytest.mark.multiproc
def test_a_missing_rank_fails_fast_with_rank_and_address(tiny, tmp_path, env):
    port = free_port()
    lonely = {
        **env,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    result = subprocess.run(
        [sys.executable, *train_args(tiny, tmp_path / "run", "train.dist_timeout_s=5")],
        env=lonely,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert f"rank 0 could not join the process group at 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("method", ["ce", "iam"])
@pytest.mark.multiproc
def test_sync_budget_per_step(method, tiny, tmp_path, env):
    """Per step, besides DDP's gradient all-reduce: one small all-reduce (the next batch's
    header), plus for iam the contrastive gather (forward) and its all-to-all (backward); no
    host read-back except on log steps, which do read back."""
    counts_file = tmp_path / "counts.json"
    args = small_overrides(
        tiny, tmp_path / "run", 8, "train.epochs=1", f"method.name={method}", "train.log_every=3"
    )
    args = [a for a in args if a != "data.num_workers=0"] + ["data.num_workers=1"]
    run(torchrun(2, str(PROCS / "sync_budget.py"), str(counts_file), *args), env)
    steps = {int(k): v for k, v in json.loads(counts_file.read_text()).items()}
    assert len(steps) == 6  # 89 train images over 2 ranks x 8 per batch: 6 steps
    inner = [steps[s] for s in sorted(steps)[1:]]  # the first step also opens the epoch
    for counts in inner:
        reads = sum(v for k, v in counts.items() if k.startswith("read:"))
        assert counts.get("all_reduce", 0) == 1, counts
        if counts["log"]:
            assert reads > 0, counts  # the counter sees read-backs where they happen
        else:
            assert reads == 0, counts
        expected_gathers = 1 if method == "iam" else 0
        assert counts.get("all_gather", 0) == expected_gathers, counts
        assert counts.get("broadcast", 0) == 0, counts


@pytest.mark.multiproc
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(tiny, tmp_path, env):
    """Rank 1 alone asks to stop in its callback on log step 3 (after that step's header):
    the ranks agree at the next log step, 6, instead of rank 1 leaving the collectives alone."""
    args = small_overrides(tiny, tmp_path / "run", 8, "train.log_every=3", "method.name=ce")
    result = run(torchrun(2, str(PROCS / "stop_one_rank.py"), "3", *args), env, timeout=240)
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for line in result.stdout.splitlines()
        if "RESULT " in line
    ]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {(r["stopped"], r["epoch"], r["batch"]) for r in results} == {(True, 1, 0)}
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]
    assert state["step"] == 6


@pytest.mark.parametrize("method", ["elr", "dividemix"])
@pytest.mark.multiproc
def test_the_per_sample_memory_is_merged_over_the_ranks(method, tiny, tmp_path, env):
    """Each rank sees half of the training samples; the memory rank 0 saves holds every one."""
    run_dir = tmp_path / "run"
    extra = (f"method.name={method}", "method.warmup_epochs=1", "train.epochs=2")
    run(torchrun(2, *train_args(tiny, run_dir, *extra)), env)
    memory = torch.load(run_dir / "last.pt", weights_only=True)["memory"]
    meta = json.loads((tiny / "dataset.json").read_text())
    train_count = sum(s["count"] for s in meta["shards"].values() if s["split"] == "train")
    assert len(set(memory["keys"])) == len(memory["keys"]) == train_count
    assert memory["seen_keys"] == []
    if method == "elr":  # every sample's target moved off its start, 0
        assert (memory["rows"] != 0).any(1).all()
    else:  # clean probabilities, some below the start, 1 (a posterior may round to 1)
        assert ((memory["rows"] >= 0) & (memory["rows"] <= 1)).all() and (memory["rows"] < 1).any()


@pytest.mark.multiproc
def test_label_scores_and_a_clean_up_round_over_two_ranks(tiny, tmp_path, env):
    """Each rank scores the samples it trained on; rank 0 gathers them at each save and alone
    keeps them, so each round's ranking and checkpoint hold every training sample once, and the
    corrections it proposes reach both ranks (the final round trains on them everywhere)."""
    run_dir = tmp_path / "run"
    run(torchrun(2, *train_args(tiny, run_dir, "train.refine_rounds=1")), env)
    manifest = pq.read_table(tiny / "manifest.parquet").to_pylist()
    train_keys = sorted(r["key"] for r in manifest if r["split"] == "train")
    for folder in (run_dir / "rounds" / "0", run_dir):
        ranked = pq.read_table(folder / "label_scores.parquet").column("key").to_pylist()
        assert sorted(ranked) == train_keys
        saved = torch.load(folder / "last.pt", weights_only=True)["scores"]
        assert sorted(saved["keys"]) == train_keys and saved["ints"].shape == (len(train_keys), 5)
    corrections = pq.read_table(run_dir / "rounds" / "0" / "corrections.parquet").to_pylist()
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    assert corrections and rounds[0]["corrections"] == len(corrections)
    assert rounds[1]["labels_corrected_before"] == len(corrections)
