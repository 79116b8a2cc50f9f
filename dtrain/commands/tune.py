"""`dtrain tune` on the command line: a search file, the base config and overrides as for
`dtrain train`, and one flag per search setting (default: the file's `search:` section, then
the setting's own default)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from dtrain.tune.settings import SearchSettings


def add_tune_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "tune",
        help="search hyperparameters with Ray Tune (ASHA, random/grid/TPE)",
        description="Search the config keys of a search file (e.g. tuning/iam_search.yaml) with "
        "Ray Tune; each trial is a dtrain run. Rerun the same command with --resume to continue "
        "an interrupted search.",
    )
    parser.add_argument("search_file", help="YAML with `space:` (and optionally `search:`)")
    parser.add_argument("--config", help="base dtrain config, as for `dtrain train`")
    parser.add_argument("--resume", action="store_true", help="continue the search in its folder")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="fixed overrides of the base config"
    )
    hints = typing.get_type_hints(SearchSettings)
    for f in fields(SearchSettings):
        hint = hints[f.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = str if choices else hint
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            choices=choices,
            default=None,
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    return parser


def run_tune(args: argparse.Namespace) -> None:
    from dtrain.tune.search import run_search
    from dtrain.tune.search_outputs import write_outputs
    from dtrain.tune.settings import load_search

    flags = {f.name: getattr(args, f.name) for f in fields(SearchSettings)}
    search = load_search(args.search_file, args.config, args.overrides, flags)
    grid = run_search(search, resume=args.resume)
    write_outputs(search, grid)
