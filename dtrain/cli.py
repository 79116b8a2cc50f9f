"""The `dtrain` command line. Errors the user can fix (dtrain.errors.DtrainError) print one
line and exit 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import sys

from dtrain import stop_signal


def _add_train(sub: argparse._SubParsersAction) -> None:
    from dtrain.registry import methods_help

    p = sub.add_parser(
        "train",
        help="train a classifier on noisy labels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with the config (defaults < --config YAML < key=value overrides). "
        "With no arguments: prepare the embedded Br35H set if missing and train the method.\n\n"
        "methods (method.name=..., presets in configs/<name>.yaml):\n" + methods_help(),
    )
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])


def _run_train(args: argparse.Namespace) -> None:
    from dtrain.config import load_config
    from dtrain.train.checkpoint import LAST
    from dtrain.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    config.validate()
    # SIGTERM / SIGUSR1 (main() installed the handlers) or the job's stop file: checkpoint at
    # the next log step and exit 0; `--resume` continues.
    stop_file = stop_signal.stop_file()
    has_checkpoint = (config.run_path / LAST).exists()
    resume = args.resume == "yes" or (args.resume == "auto" and has_checkpoint)
    trainer = Trainer(config, resume=resume, stop=stop_signal.requested, stop_file=stop_file)
    if args.resume == "auto" and trainer.is_main:
        print(f"--resume auto: {'resuming' if has_checkpoint else 'starting'} {trainer.run_dir}")
    result = trainer.fit()
    if result.get("stopped") and stop_file is not None and stop_signal.requested.is_set():
        stop_signal.acknowledgement(stop_file).touch()


def _run_eval(args: argparse.Namespace) -> None:
    from dtrain.train.run_eval import evaluate_run

    evaluate_run(args.run_dir, args.split, args.checkpoint)


def _resume_flag_alone(argv: list[str]) -> list[str]:
    """`train --resume` takes an optional value (`auto`); a `key=value` after a bare `--resume`
    is an override, not that value."""
    commands = [a for a in argv if not a.startswith("-")]
    if not commands or commands[0] != "train":
        return argv
    return [
        "--resume=yes" if a == "--resume" and argv[i + 1 : i + 2] not in (["yes"], ["auto"]) else a
        for i, a in enumerate(argv)
    ]


def main(argv: list[str] | None = None) -> None:
    # first of all: a stop signal that arrives while dtrain imports torch must not kill it
    stop_signal.install_handlers()
    from dtrain.errors import DtrainError
    from dtrain.launch.cli import add_launch_parser, run_launch
    from dtrain.prepare.cli import add_prepare_parser, run_prepare
    from dtrain.tune.cli import add_tune_parser, run_tune

    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__)
    # the deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says
    # the same, so it is accepted and not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    _add_train(sub)
    _add_eval(sub)
    add_tune_parser(sub)
    add_launch_parser(sub)
    # key=value overrides may stand anywhere, also after flags (`tune FILE --config X a=b`)
    argv = _resume_flag_alone(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    if args.command != "train":
        stop_signal.restore_defaults()  # only training checkpoints on a stop request
    commands = {
        "prepare": run_prepare,
        "train": _run_train,
        "eval": _run_eval,
        "tune": run_tune,
        "launch": run_launch,
    }
    try:
        commands[args.command](args)
    except DtrainError as err:
        print(f"dtrain {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
