"""The `command` kind: a `refiners NAME` subcommand, registered with `refiners_register_commands`."""

IMPLEMENTATION = '''\
"""`refiners $name`: a refiners command.

The skeleton lists the tensors of a weights file; replace `configure` and `run` with your command and keep `tests/`
passing.

Errors follow refiners' rule: raise an exception whose message names the thing at fault; `refiners` prints it as one
line (`refiners $name: error: ...`) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refiners_core.weights import load_tensors


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .safetensors, .pth, .pt, .ckpt or .bin weights file")


def run(args: argparse.Namespace) -> int:
    tensors = load_tensors(args.file)
    for key, tensor in sorted(tensors.items()):
        print(f"{key}\\t{tuple(tensor.shape)}\\t{str(tensor.dtype).removeprefix('torch.')}")
    return 0
'''

PLUGIN = '''\
"""The hooks of $distribution (entry point `$entry_point` in the `refiners` group)."""

from __future__ import annotations

import argparse

from refiners_core.plugins import CommandRegistrar, hookimpl


def _configure(parser: argparse.ArgumentParser) -> None:
    from $package.command import configure

    configure(parser)


def _run(args: argparse.Namespace) -> int:
    from $package.command import run

    return run(args)


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    cli.add_command("$name", _run, help="$summary", configure=_configure)
'''

TESTS = '''\
"""`refiners $name` runs through the refiners CLI and reports bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refiners_core.cli import main
from refiners_core.plugins import reset_registry
from refiners_core.weights import save_tensors


@pytest.fixture(autouse=True)
def fresh_registry() -> None:
    reset_registry()


def test_the_command_lists_the_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_tensors(tmp_path / "w.safetensors", {"b": torch.zeros(2, 3), "a": torch.zeros(4, dtype=torch.float16)})

    assert main(["$name", str(tmp_path / "w.safetensors")]) == 0

    assert capsys.readouterr().out.splitlines() == ["a\\t(4,)\\tfloat16", "b\\t(2, 3)\\tfloat32"]


def test_a_missing_file_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["$name", str(tmp_path / "missing.safetensors")]) == 2

    error = capsys.readouterr().err
    assert error.count("\\n") == 1
    assert error.startswith("refiners $name: error: ") and "missing.safetensors" in error
'''

MODULE = "command"
EXPORTS = ("configure", "run")
DEPENDENCIES: tuple[str, ...] = ()
