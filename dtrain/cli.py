"""The `dtrain` command line. Errors the user can fix (dtrain.errors.DtrainError) print one
line and exit 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import sys

from dtrain.prepare.cli import add_prepare_parser, run_prepare
from dtrain.tune.cli import add_tune_parser, run_tune


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
    p.add_argument("--resume", action="store_true", help="continue the run in train.run_dir")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. method.group_size=4 optim.lr=0.1"
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])


def _run_train(args: argparse.Namespace) -> None:
    import signal

    from dtrain.config import load_config
    from dtrain.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    config.validate()
    trainer = Trainer(config, resume=args.resume)
    # SLURM sends SIGTERM (or the --signal of your choice) before preemption or the time limit:
    # checkpoint at the next log step and exit; `--resume` continues.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: trainer.request_stop())
    trainer.fit()


def _run_eval(args: argparse.Namespace) -> None:
    from dtrain.train.run_eval import evaluate_run

    evaluate_run(args.run_dir, args.split, args.checkpoint)


def main(argv: list[str] | None = None) -> None:
    from dtrain.errors import DtrainError

    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__)
    # the deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says
    # the same, so it is accepted and not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    _add_train(sub)
    _add_eval(sub)
    add_tune_parser(sub)
    # key=value overrides may stand anywhere, also after flags (`tune FILE --config X a=b`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    commands = {"prepare": run_prepare, "train": _run_train, "eval": _run_eval, "tune": run_tune}
    try:
        commands[args.command](args)
    except DtrainError as err:
        print(f"dtrain {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
