"""`refiners plugin new NAME [--kind KIND] [--dir DIR]`: write a ready plugin package to start from."""

from __future__ import annotations

import argparse
from pathlib import Path

PLUGIN_HELP = "Tools for plugin authors: `refiners plugin new NAME` writes a ready plugin package"
_KINDS = (
    "adapter",
    "model",
    "solver",
    "command",
    "generate-option",
)  # refiners_core.scaffold.KINDS, without its import


def configure(parser: argparse.ArgumentParser) -> None:
    from refiners_core.cli import COMMAND_PROG

    subcommands = parser.add_subparsers(dest="plugin_command", metavar="SUBCOMMAND", required=True)
    new = subcommands.add_parser(
        "new",
        help="write a new plugin package (entry point, hooks, skeleton, tests, README, noxfile)",
        description="Write a plugin package whose tests pass as written; `pip install -e NAME[test]` then "
        "`refiners plugins` lists it.",
    )
    new.add_argument("name", help="the distribution name, e.g. acme-glow (import name acme_glow)")
    new.add_argument("--kind", choices=_KINDS, default="adapter", help="what the plugin offers (default: adapter)")
    new.add_argument("--dir", type=Path, default=None, help="the folder to write (default: ./NAME); must be empty")
    new.set_defaults(**{COMMAND_PROG: new.prog})


def run(args: argparse.Namespace) -> int:
    from refiners_core.scaffold import PluginNames, new_plugin

    folder = new_plugin(args.name, kind=args.kind, into=args.dir)
    names = PluginNames.of(args.name)
    print(f"Wrote the {args.kind} plugin {names.distribution} (import {names.package}) into {folder}")
    print(f'Next: pip install -e "{folder}[test]" && refiners plugins && pytest {folder}')
    return 0
