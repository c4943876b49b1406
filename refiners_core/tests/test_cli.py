"""The `refiners` command line, run in-process with plugins made visible through metadata on `sys.path`."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refiners_core.cli import demo, main
from refiners_core.cli.plugins import format_table
from refiners_core.plugins import PluginError, PluginRecord
from refiners_core.testing import GREETER_PLUGIN

AddPlugin = Callable[..., str]  # the `plugin_site` fixture of conftest.py


BROKEN = "import refiners_test_dependency_that_does_not_exist\n"


def test_help_lists_builtin_and_plugin_commands_despite_a_broken_plugin(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-greeter", GREETER_PLUGIN)
    plugin_site("t-broken", BROKEN)

    with pytest.raises(SystemExit) as exited:
        main(["--help"])

    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "plugins" in out
    assert "demo" in out
    assert "t-hello" in out and "Greet someone [t-greeter]" in out
    assert "t-broken" in out and "refiners plugins` shows why" in out


def test_plugin_command_is_configured_and_run_with_its_arguments(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-greeter", GREETER_PLUGIN)

    assert main(["t-hello", "--name", "refiners"]) == 3
    assert capsys.readouterr().out == "hello refiners\n"


def test_broken_plugin_is_warned_about_on_stderr_when_running_another_command(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-greeter", GREETER_PLUGIN)
    plugin_site("t-broken", BROKEN)

    assert main(["t-hello"]) == 3

    warnings = [line for line in capsys.readouterr().err.splitlines() if "t-broken" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("refiners: warning: refiners plugin t-broken 1.0 (entry point `t-broken = ")
    assert "ModuleNotFoundError" in warnings[0]


def test_plugin_command_whose_configure_fails_does_not_break_other_commands(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site(
        "t-bad-command",
        """
        from refiners_core.plugins import hookimpl

        def configure(parser):
            raise RuntimeError("bad configure")

        @hookimpl
        def refiners_register_commands(cli):
            cli.add_command("t-bad", lambda args: 0, configure=configure)
        """,
    )
    plugin_site("t-greeter", GREETER_PLUGIN)

    assert main(["t-hello"]) == 3
    capsys.readouterr()
    assert main(["t-bad"]) == 2
    assert capsys.readouterr().err == "refiners t-bad: error: bad configure\n"


def test_plugins_command_prints_a_table_and_exits_0_with_a_broken_plugin(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    greeter = plugin_site("t-greeter", GREETER_PLUGIN, version="0.3")
    broken = plugin_site("t-broken", BROKEN)

    assert main(["plugins"]) == 0

    captured = capsys.readouterr()
    rows = {cells[0]: cells for cells in (re.split(r" {2,}", line) for line in captured.out.splitlines())}
    assert rows["DISTRIBUTION"] == ["DISTRIBUTION", "VERSION", "ENTRY POINT", "REGISTERS", "STATUS"]
    assert rows["t-greeter"] == [
        "t-greeter",
        "0.3",
        greeter,
        "adapters: t-scale; models: t-model; commands: t-hello; generate options: --t-style",
        "ok",
    ]
    assert rows["t-broken"] == [
        "t-broken",
        "1.0",
        broken,
        "-",
        "error: import failed: ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'",
    ]
    assert captured.err == ""  # the table already shows the problem


def test_plugins_json_has_one_object_per_entry_point_with_the_documented_keys(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    greeter = plugin_site("t-greeter", GREETER_PLUGIN)
    plugin_site("t-broken", BROKEN)

    assert main(["plugins", "--json"]) == 0

    objects = {item["distribution"]: item for item in json.loads(capsys.readouterr().out)}
    assert objects["t-greeter"] == {
        "distribution": "t-greeter",
        "version": "1.0",
        "entry_point": greeter,
        "adapters": ["t-scale"],
        "models": ["t-model"],
        "solvers": [],
        "commands": ["t-hello"],
        "generate_options": ["--t-style"],
        "error": None,
        "status": "ok",
    }
    assert objects["t-broken"]["status"] == "error"
    assert "ModuleNotFoundError" in objects["t-broken"]["error"]


def test_strict_mode_makes_a_plugin_error_a_one_line_cli_error(
    plugin_site: AddPlugin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = plugin_site("t-broken", BROKEN)
    monkeypatch.setenv("REFINERS_STRICT_PLUGINS", "1")

    assert main(["plugins"]) == 2

    assert capsys.readouterr().err == (
        f"refiners: error: refiners plugin t-broken 1.0 (entry point `{broken}`): import failed: "
        "ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'\n"
    )


def test_strict_mode_with_verbose_shows_the_plugin_error_chained_from_the_original(
    plugin_site: AddPlugin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-broken", BROKEN)
    monkeypatch.setenv("REFINERS_STRICT_PLUGINS", "1")

    assert main(["--verbose", "plugins"]) == 2

    err = capsys.readouterr().err
    assert "ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'" in err
    assert f"{PluginError.__module__}.PluginError: refiners plugin t-broken 1.0" in err


def test_version_option_prints_the_refiners_core_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])

    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("refiners ")


def test_plugin_table_shows_a_dash_for_a_plugin_that_registers_nothing() -> None:
    table = format_table([PluginRecord("refiners-sam", "0.1.0", "sam = refiners_sam.plugin")])

    assert table.splitlines() == [
        "DISTRIBUTION  VERSION  ENTRY POINT                REGISTERS  STATUS",
        "refiners-sam  0.1.0    sam = refiners_sam.plugin  -          ok",
    ]


DEMO_MODELS = """
    from refiners_core.plugins import ModelSpec, hookimpl

    def demo(*, seed, lora_rank, output_dir, quiet):
        print(f"t-demo ran with seed {seed}, rank {lora_rank}, into {output_dir}, quiet {quiet}")
        return [("the t-demo model works", True), ("a check that fails", False)]

    def broken_demo(**options):
        raise RuntimeError("no memory left")

    @hookimpl
    def refiners_register_models(register):
        register(ModelSpec("t-demo", dict, summary="A demo model", demo=demo))
        register(ModelSpec("t-broken-demo", dict, demo=broken_demo))
        register(ModelSpec("t-no-demo", dict))
"""


def test_model_demos_run_with_the_demo_options_and_report_their_checks(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site("t-demos", DEMO_MODELS)
    monkeypatch.setenv("REFINERS_DISABLE_PLUGINS", "refiners-sd15")  # its real demo, where installed, is slower
    args = argparse.Namespace(seed=3, rank=5, output_dir=tmp_path, quiet=True)

    checks = demo._model_demos(args)  # pyright: ignore[reportPrivateUsage]

    out = capsys.readouterr().out
    assert f"t-demo ran with seed 3, rank 5, into {tmp_path}, quiet True" in out
    assert "model 't-demo' from the plugin registry: A demo model" in out
    assert "t-no-demo" not in out
    assert checks == [
        ("t-broken-demo: the demo raised RuntimeError: no memory left", False),
        ("t-demo: the t-demo model works", True),
        ("t-demo: a check that fails", False),
    ]


FAILING_COMMAND = """
    import builtins
    import sys
    from refiners_core.plugins import hookimpl

    class WeightsProblem(ValueError):
        pass

    class UserFacing(Exception):
        pass

    class Escape(BaseException):
        pass

    OURS = {"WeightsProblem": WeightsProblem, "UserFacing": UserFacing, "Escape": Escape}

    def configure(parser):
        parser.add_argument("kind")
        parser.add_argument("message", nargs="?", default="")

    def run(args):
        if args.kind == "exit":
            sys.exit(int(args.message))
        if args.kind == "missing-file":
            raise FileNotFoundError(2, "No such file or directory", args.message)
        raise (OURS.get(args.kind) or getattr(builtins, args.kind))(args.message)

    @hookimpl
    def refiners_register_commands(cli):
        cli.add_command("t-fail", run, help="Fail as told", configure=configure)
"""


@pytest.fixture
def failing_command(plugin_site: AddPlugin) -> None:
    """`refiners t-fail KIND [MESSAGE]` raises KIND(MESSAGE) (`exit N` calls sys.exit(N))."""
    plugin_site("t-failing", FAILING_COMMAND)


@pytest.mark.parametrize(
    ("kind", "message", "line"),
    [
        ("ValueError", "--steps must be at least 1, got 0", "--steps must be at least 1, got 0"),
        (
            "WeightsProblem",
            "x.safetensors: not a\nsafetensors file\n\n  (bad header)",
            "x.safetensors: not a safetensors file (bad header)",
        ),
        ("KeyError", "no model named 'x' is registered", "no model named 'x' is registered"),
        ("missing-file", "x.safetensors", "[Errno 2] No such file or directory: 'x.safetensors'"),
        ("RuntimeError", "", "RuntimeError"),
        ("UserFacing", "the LoRA file names no layer", "the LoRA file names no layer"),
        (
            "AttributeError",
            "'NoneType' object has no attribute 'x'",
            "AttributeError: 'NoneType' object has no attribute 'x'",
        ),
        ("ZeroDivisionError", "division by zero", "ZeroDivisionError: division by zero"),
        ("GeneratorExit", "", "GeneratorExit"),
        ("Escape", "out", "out"),
    ],
)
def test_an_exception_escaping_a_command_is_one_error_line_with_exit_code_2(
    failing_command: None, capsys: pytest.CaptureFixture[str], kind: str, message: str, line: str
) -> None:
    assert main(["t-fail", kind, message]) == 2

    assert capsys.readouterr() == ("", f"refiners t-fail: error: {line}\n")


def test_a_very_long_error_message_is_cut_on_its_one_line(
    failing_command: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["t-fail", "ValueError", "bad key; " * 1000]) == 2

    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("refiners t-fail: error: bad key; bad key;")
    assert line.endswith("... (cut; `refiners --verbose` shows it whole)")
    assert len(line) < 600


@pytest.mark.parametrize("how", ["option", "environment"])
def test_verbose_shows_the_traceback_instead_of_the_error_line(
    failing_command: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "environment":
        monkeypatch.setenv("REFINERS_VERBOSE", "1")

    assert main([*(["--verbose"] if how == "option" else []), "t-fail", "ValueError", "bad\nvalue"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("ValueError: bad\nvalue\n")
    assert "refiners t-fail: error:" not in err


def test_verbose_is_listed_as_a_global_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])

    assert "--verbose" in capsys.readouterr().out


def test_verbose_after_the_command_is_a_usage_error_of_that_command(
    failing_command: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["t-fail", "ValueError", "x", "--verbose"])

    assert exited.value.code == 2
    assert "refiners t-fail: error: unrecognized arguments: --verbose" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["t-fail"], "refiners t-fail"),
        (["t-fail", "ValueError", "x", "--unknown"], "refiners t-fail"),
        (["t-no-such-command"], "refiners"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(
    failing_command: None, capsys: pytest.CaptureFixture[str], argv: list[str], prog: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"{prog}: error: ") and err.endswith(f" (see `{prog} --help`)\n")


@pytest.mark.parametrize("code", [0, 1, 4])
def test_system_exit_raised_by_a_command_keeps_its_code(
    failing_command: None, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["t-fail", "exit", str(code)])

    assert exited.value.code == code
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("message", ["", "stop"])
def test_keyboard_interrupt_in_a_command_exits_130_with_one_line(
    failing_command: None, capsys: pytest.CaptureFixture[str], message: str
) -> None:
    assert main(["t-fail", "KeyboardInterrupt", message]) == 130

    assert capsys.readouterr().err == "refiners t-fail: interrupted\n"


KINDS = ["ValueError", "KeyError", "RuntimeError", "WeightsProblem", "UserFacing", "AttributeError", "Escape"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), message=st.text(max_size=600))
def test_any_exception_message_becomes_exactly_one_error_line(
    failing_command: None, capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    capsys.readouterr()

    assert main(["t-fail", kind, "--", message]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert err == line + "\n"
    assert line.startswith("refiners t-fail: error: ")
    words = " ".join(message.split())
    if words and len(words) <= 500:
        assert line.endswith(words)
    assert len(line) < 600


NESTED_COMMAND = """
    from refiners_core.plugins import hookimpl

    def configure(parser):
        subcommands = parser.add_subparsers(dest="what", required=True)
        for name in ("lora", "embedding"):
            sub = subcommands.add_parser(name)
            sub.set_defaults(command_prog=sub.prog)
        subcommands.add_parser("plain")

    def run(args):
        raise ValueError(f"cannot fit a {args.what}")

    @hookimpl
    def refiners_register_commands(cli):
        cli.add_command("t-fit", run, help="Fail in a subcommand", configure=configure)
"""


@pytest.mark.parametrize(
    ("what", "prog"),
    [("lora", "refiners t-fit lora"), ("embedding", "refiners t-fit embedding"), ("plain", "refiners t-fit")],
)
def test_a_subcommand_that_sets_command_prog_is_named_in_its_error_line(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str], what: str, prog: str
) -> None:
    plugin_site("t-nested", NESTED_COMMAND)

    assert main(["t-fit", what]) == 2

    assert capsys.readouterr() == ("", f"{prog}: error: cannot fit a {what}\n")
