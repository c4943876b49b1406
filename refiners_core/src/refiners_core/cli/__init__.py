"""The `refiners` command line.

Built-in commands (`plugins`, `demo`) are registered by this module through the `refiners_register_commands`
hook, exactly like the commands of installed plugins. Only the names and help lines of commands are needed
for `refiners --help`; a command's `configure` runs only when that command is invoked, so a broken plugin
command cannot break the others.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import importlib_metadata

from refiners_core.cli import plugins
from refiners_core.plugins import CommandRegistrar, RefinersPluginWarning, Registry, hookimpl, registry

DEMO_HELP = (
    "Build a small model offline, inject and eject a LoRA, show that the model is restored exactly, "
    "then run the demos of installed models"
)


def main(argv: list[str] | None = None) -> int:
    """Run `refiners` with `argv` (default: `sys.argv[1:]`) and return its exit code.

    As with any argparse program, `--help`, `--version` and usage errors exit through SystemExit. Plugin
    failures are warned about on stderr and never stop the CLI, unless `REFINERS_STRICT_PLUGINS=1`, which
    raises `PluginError`.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RefinersPluginWarning)
        loaded = registry()
    parser = _parser(loaded)
    args, rest = parser.parse_known_args(argv)
    if args.command != "plugins":  # `refiners plugins` shows the same problems in its table
        for warning in caught:
            if issubclass(warning.category, RefinersPluginWarning):
                print(f"refiners: warning: {warning.message}", file=sys.stderr)
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if args.command is None:
        parser.print_help()
        return 0
    spec = loaded.commands[args.command]
    command_parser = argparse.ArgumentParser(prog=f"refiners {spec.name}", description=spec.help or None)
    if spec.configure is not None:
        spec.configure(command_parser)
    result = spec.run(command_parser.parse_args(rest))
    return 0 if result is None else int(result)


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    """Register the built-in commands."""
    cli.add_command(
        "plugins",
        plugins.run,
        help="List installed plugins, what each registers, and which failed to load",
        configure=plugins.configure,
    )
    cli.add_command("demo", _run_demo, help=DEMO_HELP, configure=_configure_demo)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    from refiners_core.cli import demo

    demo.configure(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from refiners_core.cli import demo

    return demo.run(args)


def _parser(loaded: Registry) -> argparse.ArgumentParser:
    failed = [record.distribution for record in loaded.plugins if record.status == "error"]
    epilog = None
    if failed:
        epilog = f"{len(failed)} plugin(s) failed to load ({', '.join(failed)}): `refiners plugins` shows why."
    parser = argparse.ArgumentParser(
        prog="refiners",
        description="Refiners: adapters and models for PyTorch, extended by installed plugins.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    origins = {name: record.distribution for record in loaded.plugins for name in record.commands}
    for spec in loaded.commands.values():
        origin = f" [{origins[spec.name]}]" if spec.name in origins else ""
        # Arguments are parsed later by the command's own parser: this one only dispatches.
        commands.add_parser(spec.name, help=f"{spec.help}{origin}", add_help=False)
    return parser


def _version() -> str:
    try:
        return importlib_metadata.version("refiners-core")
    except importlib_metadata.PackageNotFoundError:
        return "(not installed)"
