"""`dtrain train` on the command line. `dtrain launch slurm` parses the train arguments it hands
on with the same parser, so both accept exactly the same thing."""

from __future__ import annotations

import argparse

from dtrain import stop_signal
from dtrain.commands import Command
from dtrain.methods.registry import methods_help
from dtrain.train.selection import RULES

SELECTION_HELP = "\n".join(f"  {name:20s}{rule.describe}" for name, rule in RULES.items())
DESCRIPTION = (
    "Train with the config (defaults < --config YAML < key=value overrides). "
    "With no arguments: prepare the embedded Br35H set if missing and train the method.\n\n"
    "methods (method.name=..., presets in configs/<name>.yaml):\n"
    + methods_help()
    + "\n\nthe weights best.pt holds (train.select=..., chosen without clean labels):\n"
    + SELECTION_HELP
    + "\n\nlabel clean-up rounds (train.refine_rounds=N): after each round, relabel to the "
    "model's prediction\nthe samples it suspects most and disagrees with; the next round "
    "trains on the corrected labels;\ntrain.refine_folds=K cross-fits a round: K models, "
    "each judging the labels it hid"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config, e.g. configs/iam.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        choices=["yes", "auto"],
        help="continue the run in train.run_dir; `--resume auto` continues it if it has a "
        "checkpoint and starts it otherwise (one command line for a job's first start and "
        "every requeue)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. method.group_size=4 optim.lr=0.1"
    )


def resume_flag_alone(argv: list[str]) -> list[str]:
    """`train --resume` takes an optional value (`auto`); a `key=value` or a flag after a bare
    `--resume` is not that value (any other word is, and argparse names it if it is no choice).
    `argv` starts at the subcommand or before it."""
    commands = [a for a in argv if not a.startswith("-")]
    if not commands or commands[0] != "train":
        return argv
    return [
        "--resume=yes" if a == "--resume" and _not_a_value(argv[i + 1 : i + 2]) else a
        for i, a in enumerate(argv)
    ]


def _not_a_value(after: list[str]) -> bool:
    return not after or after[0].startswith("-") or "=" in after[0]


def run(args: argparse.Namespace) -> None:
    from dtrain.config import load_config

    config = load_config(args.config, args.overrides)
    config.validate()  # a bad key is refused before torch is imported
    from dtrain.train import train
    from dtrain.train.rounds import has_progress

    # SIGTERM / SIGUSR1 (the CLI's first act installed the handlers) or the job's stop file:
    # checkpoint at the next log step and exit 0; `--resume` continues.
    stop_file = stop_signal.stop_file()
    resume = args.resume == "yes" or (args.resume == "auto" and has_progress(config))
    result = train(
        config,
        resume=resume,
        stop=stop_signal.requested,
        stop_file=stop_file,
        say_resume=args.resume == "auto",
    )
    if result.get("stopped") and stop_file is not None and stop_signal.requested.is_set():
        stop_signal.acknowledgement(stop_file).touch()


COMMAND = Command(
    name="train",
    order=30,
    help="train a classifier on noisy labels",
    description=DESCRIPTION,
    add_arguments=add_arguments,
    run=run,
    raw_description=True,
    stop_handlers=True,
)
