"""The launch layer without a cluster: the job environment from SLURM's variables, templates
rendered and checked against a partition's nodes, the supervisor's stop file, and `dtrain train`
under a stop signal and `--resume auto`. On a real cluster: tests/launch/test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, catches, small_overrides, stripes_dataset

from dtrain.errors import ConfigError, DistributedError
from dtrain.launch import slurm
from dtrain.launch.slurm_env import expand_hostlist, first_host, job_exports, job_port
from dtrain.launch.supervise import stop_file_for, supervise
from dtrain.stop_signal import STOP_FILE_ENV, acknowledgement

ROOT = REPO
BIN = Path(sys.executable).parent


HOSTLISTS = {
    "gpu[03-05,09],cpu1": ["gpu03", "gpu04", "gpu05", "gpu09", "cpu1"],
    "node7": ["node7"],
    "a[1,4]": ["a1", "a4"],
    "node-[1-2]-ib": ["node-1-ib", "node-2-ib"],  # a suffix after the brackets
    "a[1-2]b[3-4]": ["a1b3", "a1b4", "a2b3", "a2b4"],  # two bracket groups
    "n[1-2],m[08-10]-z": ["n1", "n2", "m08-z", "m09-z", "m10-z"],
}


@pytest.mark.parametrize("nodelist", HOSTLISTS)
def test_first_host_keeps_the_whole_name_with_and_without_scontrol(nodelist, monkeypatch):
    expected = HOSTLISTS[nodelist]
    assert expand_hostlist(nodelist) == expected
    assert first_host(nodelist) == expected[0]  # scontrol's answer where SLURM is installed
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser's
    assert first_host(nodelist) == expected[0]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM is not installed here")
def test_the_hostlist_parser_agrees_with_scontrol(tmp_path):
    """Where this SLURM expands a list at all (22.05 refuses a suffix after brackets)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=x\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n"
    )
    for nodelist in HOSTLISTS:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            env={**os.environ, "SLURM_CONF": str(conf)},
        ).stdout.split()
        assert not out or out == expand_hostlist(nodelist), nodelist


@pytest.mark.parametrize("nodelist", ["x[1-2", "a[b]", "a,,b", "a]"])
def test_a_malformed_hostlist_is_refused(nodelist):
    with pytest.raises(DistributedError, match="cannot read the SLURM node list"):
        expand_hostlist(nodelist)


def test_the_job_port_stays_below_the_ephemeral_range():
    """Linux hands out 32768 and up to any outgoing connection: a rendezvous port there may be
    taken already. One port per job all the same: neighbouring job ids differ."""
    ports = [job_port(job) for job in range(200_000)]
    assert min(ports) >= 20000 and max(ports) < 32768
    assert all(a != b for a, b in zip(ports, ports[1:], strict=False))


JOB = {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "123456"}
STALE = {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29500", "NPROC_PER_NODE": "8"}


def test_job_exports_from_slurm_variables():
    # --gres=gpu:4 or a typed --gpus-per-node=a100:4: SLURM_GPUS_ON_NODE is 4 either way
    gpus = job_exports({**JOB, "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16"}, True)
    assert gpus == {
        "MASTER_ADDR": "127.0.0.1",  # the name resolved: no SLURM here to give a NodeAddr
        "MASTER_PORT": str(job_port(123456)),
        "NPROC_PER_NODE": "4",
        "DTRAIN_EXPORTS_JOB": "123456",
        "OMP_NUM_THREADS": "4",  # the node task's 16 CPUs over its 4 processes
    }
    cpu = job_exports({**JOB, "SLURM_CPUS_PER_TASK": "6", "DTRAIN_MASTER_ADDR": "10.1.2.3"}, False)
    assert (cpu["NPROC_PER_NODE"], cpu["OMP_NUM_THREADS"], cpu["MASTER_ADDR"]) == (
        "1",
        "6",
        "10.1.2.3",
    )


def test_inherited_rendezvous_variables_lose_to_the_jobs_own():
    """sbatch's default --export=ALL hands the job what the submitting shell exported (an
    earlier torchrun's, say): the job's values win; DTRAIN_* is how a user chooses one."""
    exports = job_exports({**JOB, **STALE, "SLURM_GPUS_ON_NODE": "2"}, True)
    assert (exports["MASTER_ADDR"], exports["MASTER_PORT"], exports["NPROC_PER_NODE"]) == (
        "127.0.0.1",
        str(job_port(123456)),
        "2",
    )
    chosen = {"DTRAIN_MASTER_PORT": "23456", "DTRAIN_NPROC_PER_NODE": "1"}
    exports = job_exports({**JOB, **STALE, **chosen}, True)
    assert (exports["MASTER_PORT"], exports["NPROC_PER_NODE"]) == ("23456", "1")


def test_ranks_under_srun_ignore_inherited_rendezvous_variables(monkeypatch):
    """Ranks started by srun alone trust MASTER_ADDR / MASTER_PORT only when the job script
    made them for this very job."""
    from dtrain.launch.slurm_env import env_from_slurm

    step = {**JOB, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    monkeypatch.setattr(os, "environ", {**step, **STALE})  # never touch the real environment
    assert env_from_slurm()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == (
        "127.0.0.1",
        str(job_port(123456)),
    )
    exported = {**step, **STALE, "DTRAIN_EXPORTS_JOB": "123456"}  # the job script's own
    monkeypatch.setattr(os, "environ", exported)
    assert env_from_slurm()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.9.9.9", "29500")


def test_gres_strings_of_scontrol():
    assert slurm.parse_gres("gpu:a100:8(S:0-1),gpu:2") == {"": 10, "a100": 8}
    assert slurm.parse_gres("(null)") == {"": 0}


NODES = [slurm.NodeShape(f"n{i}", 16, {"": 8, "a100": 8}) for i in (1, 2)]


@pytest.mark.parametrize(
    "request_args, message",
    [
        ({"nodes": 3}, "partition p has 2 node"),
        ({"nodes": 2, "cpus_per_task": 64}, "64 CPUs: the nodes of partition p have at most 16"),
        ({"launcher": "srun", "gpus_per_node": "8", "cpus_per_task": 4}, "32 CPUs"),
        ({"gpus_per_node": "h100:1"}, "1 h100 GPUs per node: .* at most 0"),
        ({"gres": "gpu:9"}, "9 GPUs per node"),
    ],
)
def test_requests_that_no_node_can_hold_are_refused(request_args, message):
    request = slurm.JobRequest(**{"launcher": "torchrun", **request_args})
    with pytest.raises(ConfigError, match=message):
        slurm.fit_to_partition(request, "p", NODES)


def test_cpus_per_task_defaults_to_the_nodes_share_per_task():
    request = slurm.JobRequest("srun", nodes=2, gpus_per_node="a100:4")
    slurm.fit_to_partition(request, "p", NODES)
    assert (request.tasks_per_node, request.cpus_per_task) == (4, 4)


@pytest.mark.parametrize(
    "request_args, message",
    [
        ({"gpus_per_node": "a100"}, "--gpus-per-node 'a100': expected 8 or a100:8"),
        ({"gres": "gpu"}, "--gres 'gpu': expected gpu:8"),
        ({"gres": "gpu:a100:8,nic:1"}, "--gres 'gpu:a100:8,nic:1'"),
        ({"gres": "shard:2"}, "--gres 'shard:2'"),
        ({"time": "4:00"}, "--time 4:00 is not longer than --warning-seconds 300"),
        ({"time": "1:2:3:4"}, "--time '1:2:3:4': expected"),
        ({"nodes": 0}, "--nodes 0"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_flag(request_args, message):
    with pytest.raises(ConfigError, match=message):
        slurm.JobRequest("torchrun", **request_args)


def test_gpu_requests_and_time_limits_are_read_as_slurm_reads_them():
    typed = slurm.JobRequest("srun", gres="gpu:a100:4", time="1-02:03:04")
    assert (typed.gpu_type, typed.gpus, typed.tasks_per_node) == ("a100", 4, 4)
    assert slurm.time_seconds("1-02:03:04") == 93784
    assert [slurm.time_seconds(t) for t in ("30", "30:15", "1:00:00", "2-0")] == [
        1800,
        1815,
        3600,
        172800,
    ]


@pytest.mark.parametrize("launcher", [*slurm.TRAIN_LAUNCHERS, "ray_tune"])
def test_every_template_renders_to_a_valid_script(launcher, tmp_path):
    request = slurm.JobRequest(launcher, nodes=3, gres="gpu:a100:2", cpus_per_task=5)
    request.partition, request.time = "big", "1:00:00"
    args = ["--config", "configs/iam.yaml", "optim.lr=0.1", "train.run_dir=a b"]
    options = slurm.directives(request, tmp_path / "slurm-%j.out")
    script = slurm.render(request.template().read_text(), options, args, Path("/opt/venv/bin"))
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=3", "#SBATCH --gres=gpu:a100:2", "#SBATCH --cpus-per-task=5"):
        assert line in lines
    assert "#SBATCH --partition=big" in lines and "#SBATCH --time=1:00:00" in lines
    assert not [line for line in lines if line.startswith("#SBATCH --gpus-per-node")]
    tasks = 2 if launcher == "srun" else 1
    assert f"#SBATCH --ntasks-per-node={tasks}" in lines
    assert f"#SBATCH --output={tmp_path}/slurm-%j.out" in lines
    assert ("#SBATCH --signal=B:USR1@300" in lines) == (launcher != "ray_tune")
    assert "set -- --config configs/iam.yaml optim.lr=0.1 'train.run_dir=a b'" in lines
    assert 'export PATH="${DTRAIN_BIN:-/opt/venv/bin}:$PATH"' in lines
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives[-1] < lines.index("set -euo pipefail")  # sbatch reads only the head
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    subprocess.run(["bash", "-n", str(request.template())], check=True)  # as shipped


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["PATH"] = f"{BIN}:/usr/bin:/bin"  # with or without SLURM on this machine
    result = subprocess.run(
        [str(BIN / "dtrain"), "launch", "slurm", "--dry-run", "--nodes", "2", "--launcher"]
        + ["accelerate", "--gpus-per-node", "a100:4", f"train.run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --gpus-per-node=a100:4" in result.stdout
    assert f"set -- train.run_dir={tmp_path}/run" in result.stdout
    assert not (tmp_path / "run").exists()


def test_a_bad_train_argument_is_refused_before_submitting(tmp_path):
    result = subprocess.run(
        [str(BIN / "dtrain"), "launch", "slurm", "--dry-run", "optim.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "optim.lr=-1" in result.stderr and "#SBATCH" not in result.stdout


@pytest.mark.multiproc
def test_a_run_folder_holding_a_run_needs_resume_as_train_would(tmp_path):
    """The train arguments go through train's own parser: a bare `--resume` before an
    override is the flag, and the override stays an override."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"a run")
    launch = [str(BIN / "dtrain"), "launch", "slurm", "--dry-run"]
    refused = subprocess.run(
        [*launch, f"train.run_dir={tmp_path}/run"], capture_output=True, text=True, cwd=ROOT
    )
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = subprocess.run(
        [*launch, "--resume", f"train.run_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"set -- --resume train.run_dir={tmp_path}/run" in resumed.stdout


@pytest.mark.multiproc
def test_too_few_train_shards_for_the_ranks_are_refused_before_submitting(tiny, tmp_path):
    """`dtrain launch` knows the ranks (nodes x GPUs) and the dataset: the job would wait in the
    queue, then fail on every rank."""
    meta = json.loads((tiny / "dataset.json").read_text())
    shards = sum(info["split"] == "train" for info in meta["shards"].values())
    launch = [str(BIN / "dtrain"), "launch", "slurm", "--dry-run", "--nodes", "2"]
    args = [f"data.path={tiny}", f"train.run_dir={tmp_path}/run"]
    refused = subprocess.run(
        [*launch, "--gpus-per-node", "a100:2", *args, f"data.num_workers={shards // 4 + 1}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert refused.returncode == 2, refused.stderr
    readers = 4 * (shards // 4 + 1)
    assert f"{shards} train shards in {tiny} cannot feed 4 ranks x" in refused.stderr
    assert f"= {readers} readers" in refused.stderr and "#SBATCH" not in refused.stdout
    fits = subprocess.run(
        [*launch, "--gpus-per-node", "a100:2", *args, f"data.num_workers={shards // 4}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert fits.returncode == 0, fits.stderr
    resampled = ["data.resampled=true", "data.samples_per_epoch=64", "data.num_workers=9"]
    drawn = subprocess.run([*launch, *args, *resampled], capture_output=True, text=True, cwd=ROOT)
    assert drawn.returncode == 0, drawn.stderr  # resampled mode draws shards: any count feeds it


def test_a_refusal_imports_nothing_heavy():
    """A refusal comes in about a second: no torch, sklearn, scipy or pandas on the way
    (checked by what is imported, not by the clock, which a busy login node would bend)."""
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "dtrain",
            "launch",
            "slurm",
            "--dry-run",
        ]
        + ["optim.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "optim.lr=-1" in result.stderr
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", result.stderr, re.M))
    assert "dtrain.commands.launch" in imported
    assert not imported & {"torch", "sklearn", "scipy", "pandas"}


# -- the supervisor -------------------------------------------------------------------------------

# a stand-in for the training ranks: wait for the stop file, then exit as the ranks would
RANKS = """
import os, sys, time
from pathlib import Path
stop = Path(os.environ["DTRAIN_STOP_FILE"])
print("ready", flush=True)
while not stop.exists():
    time.sleep(0.05)
if sys.argv[1] == "checkpointed":
    Path(str(stop) + ".stopped").touch()
sys.exit(int(sys.argv[2]))
"""


def test_the_warning_becomes_the_stop_file_the_ranks_read(tmp_path):
    env = {
        **os.environ,
        "SLURM_JOB_ID": f"{os.getpid()}",
        "SLURM_RESTART_COUNT": "0",
        "TMPDIR": str(tmp_path),
    }
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "dtrain.launch.supervise", sys.executable, "-c", RANKS]
        + ["finished", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert supervisor.stdout.readline().strip() == "ready"
    supervisor.send_signal(signal.SIGUSR1)
    out, err = supervisor.communicate(timeout=60)
    # the ranks finished on their own (no acknowledgement): no requeue, exit 0
    assert supervisor.returncode == 0, err
    assert "SIGUSR1: asking the ranks to checkpoint and stop" in err
    assert "requeue" not in err
    assert not list(tmp_path.iterdir())  # the stop file is gone: a restart starts clean


def test_a_failing_command_fails_the_job_and_is_not_requeued(tmp_path):
    env = {"SLURM_JOB_ID": "7", "TMPDIR": str(tmp_path), "PATH": os.environ["PATH"]}
    stop = stop_file_for(env)
    # warned at start-up (the batch script's trap made the stop file), the ranks fail without
    # a checkpoint
    stop.touch()
    command = [sys.executable, "-c", RANKS, "failed", "3"]
    assert supervise(command, env, stop) == 3
    assert not stop.exists() and not acknowledgement(stop).exists()


# -- dtrain train under a stop signal and --resume auto ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return stripes_dataset(tmp_path_factory.mktemp("launch"), 32, shard_size=8)


def train(data: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = small_overrides(data, run_dir, 8, "train.epochs=1", "train.log_every=1", *extra)
    return subprocess.Popen(
        [str(BIN / "dtrain"), "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_a_signal_during_start_up_is_kept_not_fatal(tiny, tmp_path):
    """USR1 as soon as the handler exists, while dtrain still imports torch: the default
    action would kill it; the CLI's first act is to install the handlers, so the run
    checkpoints at its first log step."""
    stop = tmp_path / "stop"
    proc = train(tiny, tmp_path / "run", env={**os.environ, STOP_FILE_ENV: str(stop)})
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGUSR1):  # the interpreter is up, torch not yet
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped after batch 1 of 6 in epoch 1" in out  # epochs count from 1
    assert (tmp_path / "run" / "last.pt").is_file()
    assert acknowledgement(stop).exists()  # tells the job's supervisor to requeue


@pytest.mark.slow
def test_resume_auto_starts_a_new_run_and_continues_a_stopped_one(tiny, tmp_path):
    run_dir = tmp_path / "run"
    first = train(tiny, run_dir, "--resume", "auto", "train.stop_after_steps=2")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert f"--resume auto: starting {run_dir}" in out
    # a bare --resume followed by an override: the override is not taken for its value
    again = train(tiny, run_dir, "--resume", "train.stop_after_steps=0")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1
    auto = train(tiny, run_dir, "--resume", "auto")
    out, err = auto.communicate(timeout=300)
    assert auto.returncode == 0 and f"--resume auto: resuming {run_dir}" in out
