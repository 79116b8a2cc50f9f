"""The `dtrain` command line. Errors the user can fix (dtrain.errors.DtrainError, and usage
errors) print one line and exit 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import NoReturn

from dtrain import stop_signal


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as dtrain's other errors (argparse prints the
    whole usage first); the line points to --help instead."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> None:
    # first of all: a stop signal that arrives while dtrain imports torch must not kill it
    stop_signal.install_handlers()
    from dtrain.commands.index import add_index_parser, run_index
    from dtrain.commands.launch import add_launch_parser, run_launch
    from dtrain.commands.predict import add_predict_parser, run_predict
    from dtrain.commands.prepare import add_prepare_parser, run_prepare
    from dtrain.commands.train import (
        add_eval_parser,
        add_train_parser,
        resume_flag_alone,
        run_eval,
        run_train,
    )
    from dtrain.commands.tune import add_tune_parser, run_tune
    from dtrain.errors import DtrainError
    from dtrain.runs.relabel import add_relabel_parser, run_relabel
    from dtrain.runs.review import add_review_parser, run_review

    parser = OneLineParser(prog="dtrain", description=__doc__)
    # the deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says
    # the same, so it is accepted and not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    add_index_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_review_parser(sub)
    add_relabel_parser(sub)
    add_predict_parser(sub)
    add_tune_parser(sub)
    add_launch_parser(sub)
    # (in the order a user meets them: data, train, score, review, relabel, use, search, scale)
    # key=value overrides may stand anywhere, also after flags (`tune FILE --config X a=b`)
    argv = resume_flag_alone(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    if args.command != "train":
        stop_signal.restore_defaults()  # only training checkpoints on a stop request
    commands = {
        "prepare": run_prepare,
        "index": run_index,
        "train": run_train,
        "eval": run_eval,
        "predict": run_predict,
        "tune": run_tune,
        "launch": run_launch,
        "review": run_review,
        "relabel": run_relabel,
    }
    try:
        commands[args.command](args)
    except DtrainError as err:
        print(f"dtrain {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk is the user's to fix too (checkpoints say more)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dtrain {args.command}: error: {err}; free space, then rerun", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
