"""`dtrain tune` on the command line: a search file, the base config and overrides as for
`dtrain train`, and one flag per search setting (default: the file's `search:` section, then
the setting's own default)."""

from __future__ import annotations

import argparse

from dtrain.commands import Command
from dtrain.commands.flags import add_flags, flag_values
from dtrain.tune.settings import SearchSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("search_file", help="YAML with `space:` (and optionally `search:`)")
    parser.add_argument("--config", help="base dtrain config, as for `dtrain train`")
    parser.add_argument("--resume", action="store_true", help="continue the search in its folder")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="fixed overrides of the base config"
    )
    add_flags(parser, SearchSettings, given_only=True)


def run(args: argparse.Namespace) -> None:
    from dtrain.tune.search import run_search
    from dtrain.tune.search_outputs import write_outputs
    from dtrain.tune.settings import load_search

    search = load_search(
        args.search_file, args.config, args.overrides, flag_values(args, SearchSettings)
    )
    grid = run_search(search, resume=args.resume)
    write_outputs(search, grid)


COMMAND = Command(
    name="tune",
    order=80,
    help="search hyperparameters with Ray Tune (ASHA, random/grid/TPE)",
    description="Search the config keys of a search file (e.g. tuning/iam_search.yaml) with "
    "Ray Tune; each trial is a dtrain run. Rerun the same command with --resume to continue "
    "an interrupted search.",
    add_arguments=add_arguments,
    run=run,
)
