"""The `dtrain` command line. Errors the user can fix (dtrain.errors.DtrainError, and usage
errors) print one line and exit 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import errno
import pkgutil
import sys
import types
from typing import NoReturn

from dtrain import stop_signal
from dtrain.commands import Command


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as dtrain's other errors (argparse prints the
    whole usage first); the line points to --help instead."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# the modules of dtrain.commands that declare no command
NOT_COMMANDS = ("main", "flags")


def discover(package: types.ModuleType) -> list[Command]:
    """The commands that the modules of `package` declare (`COMMAND = Command(...)`), in the
    order `dtrain --help` lists them. A module that declares none is an error."""
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in NOT_COMMANDS:
            continue
        name = f"{package.__name__}.{info.name}"
        __import__(name)  # as `import` does: `python -X importtime` lists it, import_module not
        module = sys.modules[name]
        if not isinstance(getattr(module, "COMMAND", None), Command):
            raise TypeError(f"{module.__name__} declares no COMMAND = Command(...)")
        found.append(module.COMMAND)
    return sorted(found, key=lambda command: command.order)


def main(argv: list[str] | None = None) -> None:
    # first of all: a stop signal that arrives while dtrain imports torch must not kill it
    stop_signal.install_handlers()
    from dtrain import commands as package
    from dtrain.commands.train import resume_flag_alone
    from dtrain.errors import DtrainError

    parser = OneLineParser(prog="dtrain", description=__doc__)
    # the deepspeed launcher passes --local_rank=N first; LOCAL_RANK in the environment says
    # the same, so it is accepted and not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {command.name: command for command in discover(package)}
    for command in commands.values():
        command.add_to(sub)
    # key=value overrides may stand anywhere, also after flags (`tune FILE --config X a=b`)
    argv = resume_flag_alone(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    command = commands[args.command]
    if not command.stop_handlers:
        stop_signal.restore_defaults()  # only training checkpoints on a stop request
    try:
        command.run(args)
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
