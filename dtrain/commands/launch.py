"""`dtrain launch slurm [launch options] [train arguments | tune SEARCH.yaml [tune arguments]]`:
check the dtrain arguments and the request, render the job script into the run (or search)
folder and submit it; `--dry-run` prints the script instead."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dtrain.errors import ConfigError, RunFolderError
from dtrain.launch import slurm
from dtrain.launch.slurm_env import ClusterUnavailable

if TYPE_CHECKING:
    from dtrain.config import Config


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="submit training or a search to a cluster (SLURM)",
        description=__doc__ + "\nOptions: `dtrain launch slurm --help`.",
    )
    p.add_argument("backend", choices=["slurm"])
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain launch slurm",
        allow_abbrev=False,  # an abbreviation must not swallow a train or tune flag
        description="Render a job script from launchers/ and submit it with sbatch. Arguments "
        "it does not know go to `dtrain train` (or, after `tune`, to `dtrain tune`).",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--gpus-per-node",
        default="0",
        help="N or TYPE:N (a100:8); 0: CPU nodes, one process per node (default)",
    )
    p.add_argument("--gres", help="a --gres request instead, e.g. gpu:8 or gpu:a100:8")
    p.add_argument(
        "--cpus-per-task", type=int, help="default: a node's CPUs shared among its tasks"
    )
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition", help="default: the cluster's default partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument(
        "--launcher", choices=slurm.TRAIN_LAUNCHERS, help="how training starts (default torchrun)"
    )
    p.add_argument(
        "--warning-seconds",
        type=int,
        default=300,
        help="USR1 this long before the time limit: checkpoint, requeue, resume (default 300)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")
    return p


def _train_config(args: list[str]) -> Config:
    """The config of `dtrain train ARGS`, after checking the arguments with train's own parser,
    the config as `train` would and that the run folder may be written."""
    from dtrain.commands.train import add_train_parser, resume_flag_alone
    from dtrain.config import load_config

    p = argparse.ArgumentParser(prog="dtrain launch slurm ...")
    add_train_parser(p.add_subparsers(dest="command"))
    known, extra = p.parse_known_args(resume_flag_alone(["train", *args]))
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
    from dataclasses import fields

    from dtrain.commands.tune import add_tune_parser
    from dtrain.tune.settings import SearchSettings, load_search

    p = argparse.ArgumentParser(prog="dtrain launch slurm ... tune")
    tune_args, extra = add_tune_parser(p.add_subparsers()).parse_known_args(args)
    stray = [a for a in extra if "=" not in a]
    if stray:
        raise ConfigError(f"unrecognized tune arguments: {' '.join(stray)}")
    flags = {f.name: getattr(tune_args, f.name) for f in fields(SearchSettings)}
    search = load_search(
        tune_args.search_file, tune_args.config, tune_args.overrides + extra, flags
    )
    return search.folder


def run_launch(args: argparse.Namespace) -> None:
    opts, rest = _launch_parser().parse_known_args(args.rest)
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
