"""The `refiners` command line.

Built-in commands (`plugins`, `plugin new`, `demo`) are registered by this module through the
`refiners_register_commands` hook, exactly like the commands of installed plugins. Only the names and help lines
of commands are needed for `refiners --help`; a command's `configure` runs only when that command is invoked, so a
broken plugin command cannot break the others.

How every command, built-in or from a plugin, ends:

- A command reports a problem by raising an exception whose message names the thing at fault (the file,
  the option and its value, what was expected and what was received). `main` prints it as one line on
  stderr, `refiners COMMAND: error: MESSAGE`, and exits with code 2, never with a traceback. The message's
  whitespace, newlines included, is collapsed to single spaces and a very long message is cut; the
  exception's type is shown before it only for built-in exceptions that signal a bug rather than bad input
  (`AttributeError: ...`), or when the message is empty. Errors before a command is known (a plugin error
  under `REFINERS_STRICT_PLUGINS=1`) read `refiners: error: ...`. A command with subcommands names the one
  that ran by giving its subparser the default `command_prog` (`sub.set_defaults(command_prog=sub.prog)`):
  `refiners train lora: error: ...`.
- `refiners --verbose COMMAND ...` (a global option, before the command), or `REFINERS_VERBOSE=1`, prints
  the full traceback instead of that line; the exit code stays 2.
- Ctrl-C (`KeyboardInterrupt`) prints `refiners COMMAND: interrupted` and exits with code 130.
- A usage error (an unknown option, a missing or malformed argument) is one line too, `refiners COMMAND:
  error: MESSAGE (see `refiners COMMAND --help`)`, exit code 2: the parsers are `OneLineArgumentParser`s, and
  so are the subcommand parsers a command adds. `SystemExit` raised by a command (`--help`, `sys.exit(n)`)
  keeps its code.
- Otherwise the exit code is what the command's `run` returns (None means 0).
"""

from __future__ import annotations

import argparse
import builtins
import os
import sys
import traceback
import warnings
from typing import NoReturn

import importlib_metadata

from refiners_core.cli import plugin_new, plugins
from refiners_core.plugins import CommandRegistrar, RefinersPluginWarning, Registry, hookimpl, registry

DEMO_HELP = (
    "Build a small model offline, inject and eject a LoRA, show that the model is restored exactly, "
    "then run the demos of installed models"
)


VERBOSE_ENV = "REFINERS_VERBOSE"
COMMAND_PROG = "command_prog"  # a parsed default naming a subcommand in error lines (see the module docstring)

# Exceptions whose message is written for the user: shown without their type. Other built-in exceptions
# (AttributeError, AssertionError, ZeroDivisionError, ...) signal a bug, and their type says which.
_MESSAGE_ERRORS = (ValueError, TypeError, LookupError, OSError, RuntimeError)
_MESSAGE_LIMIT = 500


class OneLineArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line on stderr, `PROG: error: MESSAGE (see `PROG
    --help`)`, exit code 2, instead of the usage followed by the error (`--help` still prints the usage). Every
    parser of `refiners` is one; `add_subparsers` makes its subparsers of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    """Run `refiners` with `argv` (default: `sys.argv[1:]`) and return its exit code.

    Errors are reported as the module docstring says: one line and exit code 2, 130 for Ctrl-C. As with any
    argparse program, `--help`, `--version` and usage errors exit through SystemExit. Plugin failures are
    warned about on stderr and never stop the CLI, unless `REFINERS_STRICT_PLUGINS=1`, which makes them an
    error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)  # copied before any plugin runs
    verbose = _verbose(argv)
    prog = "refiners"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RefinersPluginWarning)
            loaded = registry()
        parser = _parser(loaded)
        args, rest = parser.parse_known_args(argv)
        verbose = verbose or args.verbose
        if args.command != "plugins":  # `refiners plugins` shows the same problems itself
            for warning in caught:
                if issubclass(warning.category, RefinersPluginWarning):
                    print(f"refiners: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        if args.command is None:
            parser.print_help()
            return 0
        spec = loaded.commands[args.command]
        prog = f"refiners {spec.name}"
        command_parser = OneLineArgumentParser(prog=prog, description=spec.help or None)
        if spec.configure is not None:
            spec.configure(command_parser)
        command_args = command_parser.parse_args(rest)
        prog = str(getattr(command_args, COMMAND_PROG, None) or prog)
        result = spec.run(command_args)
        return 0 if result is None else int(result)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BaseException as error:
        if verbose:
            traceback.print_exc()
        else:
            print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        return 2


def error_message(error: BaseException) -> str:
    """`error` as the one line `refiners COMMAND: error: ...` shows (see the module docstring)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        message = error.args[0]  # str(KeyError) adds quotes
    else:
        message = str(error)
    message = " ".join(message.split())
    if len(message) > _MESSAGE_LIMIT:
        message = f"{message[:_MESSAGE_LIMIT]}... (cut; `refiners --verbose` shows it whole)"
    name = type(error).__name__
    if not message:
        return name
    if getattr(builtins, name, None) is type(error) and not isinstance(error, _MESSAGE_ERRORS):
        return f"{name}: {message}"
    return message


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
    cli.add_command("plugin", plugin_new.run, help=plugin_new.PLUGIN_HELP, configure=plugin_new.configure)


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
    parser = OneLineArgumentParser(
        prog="refiners",
        description="Refiners: adapters and models for PyTorch, extended by installed plugins.",
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the full traceback of an error instead of one line (or set {VERBOSE_ENV}=1)",
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    origins = {name: record.distribution for record in loaded.plugins for name in record.commands}
    for spec in loaded.commands.values():
        origin = f" [{origins[spec.name]}]" if spec.name in origins else ""
        # Arguments are parsed later by the command's own parser: this one only dispatches.
        commands.add_parser(spec.name, help=f"{spec.help}{origin}", add_help=False)
    return parser


def _verbose(argv: list[str]) -> bool:
    """Whether `--verbose` comes before the command in `argv`, or `REFINERS_VERBOSE` is set."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    for argument in argv:
        if argument == "--verbose":
            return True
        if argument == "--" or not argument.startswith("-"):
            return False
    return False


def _version() -> str:
    try:
        return importlib_metadata.version("refiners-core")
    except importlib_metadata.PackageNotFoundError:
        return "(not installed)"
