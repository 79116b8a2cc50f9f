"""`dtrain launch slurm [launch options] [train arguments | tune SEARCH.yaml [tune arguments]]`:
check the dtrain arguments and the request, render the job script into the run (or search)
folder and submit it; `--dry-run` prints the script instead."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dtrain.commands import Command
from dtrain.commands.flags import add_flags, flag_values
from dtrain.config_values import option
from dtrain.errors import ConfigError, RunFolderError
from dtrain.launch import slurm
from dtrain.launch.slurm_env import ClusterUnavailable

if TYPE_CHECKING:
    from dtrain.config import Config


@dataclass
class SlurmOptions:
    """`dtrain launch slurm`'s own options; what it does not know goes to train or tune."""

    nodes: int = option(1)
    gpus_per_node: str = option("0", "N or TYPE:N (a100:8); 0: CPU nodes, one process per node")
    gres: str | None = option(
        None, "a --gres request instead, e.g. gpu:8 or gpu:a100:8", show_default=False
    )
    cpus_per_task: int | None = option(
        None, "default: a node's CPUs shared among its tasks", show_default=False
    )
    time: str | None = option(None, "time limit, e.g. 24:00:00", show_default=False)
    partition: str | None = option(
        None, "default: the cluster's default partition", show_default=False
    )
    account: str | None = option(None)
    job_name: str | None = option(None)
    launcher: slurm.TrainLauncher | None = option(
        None, "how training starts", default_help="torchrun"
    )
    warning_seconds: int = option(
        300, "USR1 this long before the time limit: checkpoint, requeue, resume"
    )
    dry_run: bool = option(False, "print the job script, submit nothing", show_default=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backend", choices=["slurm"])
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain launch slurm",
        allow_abbrev=False,  # an abbreviation must not swallow a train or tune flag
        description="Render a job script from launchers/ and submit it with sbatch. Arguments "
        "it does not know go to `dtrain train` (or, after `tune`, to `dtrain tune`).",
    )
    add_flags(p, SlurmOptions)
    return p


def _train_config(args: list[str]) -> Config:
    """The config of `dtrain train ARGS`, after checking the arguments with train's own parser,
    the config as `train` would and that the run folder may be written."""
    from dtrain.commands import train
    from dtrain.config import load_config

    p = argparse.ArgumentParser(prog="dtrain launch slurm ...")
    train.COMMAND.add_to(p.add_subparsers(dest="command"))
    known, extra = p.parse_known_args(train.resume_flag_alone(["train", *args]))
    stray = [a for a in extra if "=" not in a]
    if stray:
        raise ConfigError(f"unrecognized train arguments: {' '.join(stray)}")
    config = load_config(known.config, known.overrides + extra)
    config.validate()
    folder = config.run_path.absolute()
    if (folder / "last.pt").exists() and not known.resume:
        raise RunFolderError(
            f"{folder} already holds a run; add --resume to continue it or set train.run_dir"
        )
    return config


def _search_folder(args: list[str]) -> Path:
    """The folder of `dtrain tune ARGS`, after checking the search as `tune` would."""
    from dtrain.commands import tune
    from dtrain.tune.settings import SearchSettings, load_search

    p = argparse.ArgumentParser(prog="dtrain launch slurm ... tune")
    tune_args, extra = tune.COMMAND.add_to(p.add_subparsers()).parse_known_args(args)
    stray = [a for a in extra if "=" not in a]
    if stray:
        raise ConfigError(f"unrecognized tune arguments: {' '.join(stray)}")
    flags = flag_values(tune_args, SearchSettings)
    search = load_search(
        tune_args.search_file, tune_args.config, tune_args.overrides + extra, flags
    )
    return search.folder


def run(args: argparse.Namespace) -> None:
    parsed, rest = _launch_parser().parse_known_args(args.rest)
    opts = SlurmOptions(**flag_values(parsed, SlurmOptions))
    if rest[:1] == ["train"]:
        rest = rest[1:]
    tune = rest[:1] == ["tune"]
    if tune:
        rest = rest[1:]
        if opts.launcher:
            raise ConfigError("--launcher is for training; a search runs on the Ray template")
    request = slurm.JobRequest(
        launcher="ray_tune" if tune else opts.launcher or "torchrun",
        nodes=opts.nodes,
        gpus_per_node=opts.gpus_per_node,
        gres=opts.gres,
        cpus_per_task=opts.cpus_per_task,
        time=opts.time,
        partition=opts.partition,
        account=opts.account,
        job_name=opts.job_name,
        warning_s=opts.warning_seconds,
    )
    if tune:
        folder = _search_folder(rest)
    else:
        config = _train_config(rest)
        folder = config.run_path.absolute()
        if not config.data.resampled:
            slurm.check_train_shards(config.data.path, request, config.data.num_workers)
    try:
        partition = slurm.partition_nodes(request.partition)
    except ClusterUnavailable as err:
        if not opts.dry_run:
            raise
        print(f"dtrain launch: note: {err}; the request is not checked", file=sys.stderr)
    else:
        slurm.fit_to_partition(request, *partition)
    log = folder / "slurm-%j.out"
    script = slurm.render(
        request.template().read_text(),
        slurm.directives(request, log),
        rest,
        slurm.python_bin(),
    )
    if opts.dry_run:
        print(script, end="")
        return
    from dtrain.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slurm_job.sbatch"
    write_atomic(path, script)
    job = slurm.submit(path)
    print(f"submitted job {job}: {path}")
    print(f"log:    {str(log).replace('%j', job)}")
    print(f"{'search' if tune else 'run'} folder: {folder}")


COMMAND = Command(
    name="launch",
    order=90,
    help="submit training or a search to a cluster (SLURM)",
    description=__doc__ + "\nOptions: `dtrain launch slurm --help`.",
    add_arguments=add_arguments,
    run=run,
)
