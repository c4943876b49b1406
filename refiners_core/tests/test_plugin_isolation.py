"""A plugin's import and hooks cannot take the registry or the CLI down, whatever they raise, print or parse."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable

import pytest

from refiners_core.cli import main
from refiners_core.plugins import PluginError, PluginRecord, RefinersPluginWarning, Registry, registry
from refiners_core.testing import GREETER_PLUGIN

AddPlugin = Callable[..., str]  # the `plugin_site` fixture of conftest.py


# Statements that end a plugin's code abruptly, and how the plugin's error describes them.
FAILURES = {
    "exit-0": ("import sys; sys.exit(0)", "SystemExit: 0"),
    "exit-3": ("import sys; sys.exit(3)", "SystemExit: 3"),
    "exit-none": ("import sys; sys.exit()", "SystemExit"),
    "exit-text": ("raise SystemExit('x')", "SystemExit: x"),
    "base-exception": (
        "class Escape(BaseException): pass\nraise Escape('out of here')",
        "Escape: out of here",
    ),
    "generator-exit": ("raise GeneratorExit", "GeneratorExit"),
    "argparse-required": (
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--weights', required=True)\n"
        "parser.parse_args()",
        "SystemExit: 2; it printed: usage: ",
    ),
    "runtime-error": ("raise RuntimeError('no GPU\\nfound')", "RuntimeError: no GPU found"),
}


def at_import(statement: str) -> str:
    return statement + "\n"


def in_hook(statement: str) -> str:
    return "from refiners_core.plugins import hookimpl\n\n@hookimpl\ndef refiners_register_models(register):\n" + (
        textwrap.indent(statement, "    ") + "\n"
    )


def record_of(loaded: Registry, distribution: str) -> PluginRecord:
    (record,) = [record for record in loaded.plugins if record.distribution == distribution]
    return record


@pytest.mark.parametrize("failure", FAILURES)
def test_plugin_that_ends_its_import_abruptly_is_recorded_and_others_still_load(
    plugin_site: AddPlugin, failure: str
) -> None:
    statement, described = FAILURES[failure]
    entry_point = plugin_site("t-failing", at_import(statement))
    plugin_site("t-greeter", GREETER_PLUGIN)
    argv = sys.argv

    with pytest.warns(RefinersPluginWarning, match=f"t-failing 1.0 \\(entry point `{entry_point}`\\)"):
        loaded = registry()

    failing = record_of(loaded, "t-failing")
    assert failing.status == "error"
    assert failing.error is not None and failing.error.startswith(f"import failed: {described}")
    assert failing.exception is not None
    assert record_of(loaded, "t-greeter").status == "ok"
    assert "t-scale" in loaded.adapters and "t-hello" in loaded.commands
    assert sys.argv is argv


@pytest.mark.parametrize("failure", FAILURES)
def test_plugin_whose_hook_ends_abruptly_registers_nothing_and_others_still_load(
    plugin_site: AddPlugin, failure: str
) -> None:
    statement, described = FAILURES[failure]
    plugin_site("t-failing", in_hook(statement))
    plugin_site("t-greeter", GREETER_PLUGIN)

    with pytest.warns(RefinersPluginWarning, match="t-failing"):
        loaded = registry()

    failing = record_of(loaded, "t-failing")
    assert failing.status == "error"
    assert failing.error is not None and failing.error.startswith(f"refiners_register_models raised {described}")
    assert record_of(loaded, "t-greeter").status == "ok"


def test_argparse_usage_printed_by_a_failing_plugin_is_in_its_error_not_on_stderr(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-failing", at_import(FAILURES["argparse-required"][0]))

    with pytest.warns(RefinersPluginWarning):
        loaded = registry()

    error = record_of(loaded, "t-failing").error
    assert error is not None
    assert "error: the following arguments are required: --weights" in error
    assert "\n" not in error
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("where", ["import", "hook"])
@pytest.mark.parametrize("interrupt", ["raise KeyboardInterrupt", "raise KeyboardInterrupt('stop')"])
def test_keyboard_interrupt_in_a_plugin_still_interrupts(
    plugin_site: AddPlugin, where: str, interrupt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-interrupting", at_import(interrupt) if where == "import" else in_hook(interrupt))
    argv, stdout = sys.argv, sys.stdout

    with pytest.raises(KeyboardInterrupt):
        registry()

    assert (sys.argv, sys.stdout) == (argv, stdout)
    assert main(["plugins"]) == 130
    assert capsys.readouterr().err == "refiners: interrupted\n"


@pytest.mark.parametrize("failure", ["exit-0", "base-exception", "argparse-required"])
def test_strict_mode_turns_any_plugin_failure_into_a_plugin_error(plugin_site: AddPlugin, failure: str) -> None:
    plugin_site("t-failing", at_import(FAILURES[failure][0]))

    with pytest.raises(PluginError, match="t-failing 1.0") as raised:
        registry(strict=True)

    assert isinstance(raised.value.__cause__, BaseException)
    assert not isinstance(raised.value.__cause__, Exception)


SEES_ARGV = """
    import argparse
    import sys

    SEEN = list(sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose-plugin", action="store_true")
    OPTIONS = parser.parse_args()  # parses whatever sys.argv holds, as a careless plugin does
    sys.argv[1:] = ["plugins", "--json"]  # and consumes or rewrites it
"""


def test_plugins_see_only_the_program_name_in_sys_argv_and_cannot_change_it(
    plugin_site: AddPlugin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_site("t-argv", SEES_ARGV)
    plugin_site("t-greeter", GREETER_PLUGIN)
    monkeypatch.setattr(sys, "argv", ["refiners", "t-hello", "--name", "argv"])

    assert main() == 3

    assert capsys.readouterr() == ("hello argv\n", "")
    assert sys.argv == ["refiners", "t-hello", "--name", "argv"]
    assert sys.modules["refiners_test_t_argv_plugin"].SEEN == ["refiners"]
    assert record_of(registry(), "t-argv").status == "ok"


PRINTS = """
    import sys
    from refiners_core.plugins import AdapterSpec, hookimpl

    print("loading t-printer...")
    print("to stderr too", file=sys.stderr)

    @hookimpl
    def refiners_register_adapters(register):
        print('{"not": "json"}')
        register(AdapterSpec("t-printed", lambda target: target))
"""


def test_what_a_plugin_prints_while_loading_is_a_warning_and_the_plugin_still_loads(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]
) -> None:
    entry_point = plugin_site("t-printer", PRINTS)

    with pytest.warns(RefinersPluginWarning) as caught:
        loaded = registry()

    expected = (
        f"refiners plugin t-printer 1.0 (entry point `{entry_point}`): printed while loading, which plugins must "
        'not do (the output was discarded): loading t-printer... to stderr too {"not": "json"}'
    )
    assert [str(warning.message) for warning in caught] == [expected]
    assert loaded.warnings == (expected,)
    assert record_of(loaded, "t-printer").status == "ok"
    assert "t-printed" in loaded.adapters
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("failure", [*FAILURES, "print"])
def test_refiners_plugins_json_stays_valid_json_whatever_a_plugin_does(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str], failure: str
) -> None:
    if failure == "print":
        plugin_site("t-failing", PRINTS)
    else:
        plugin_site("t-failing", "print('[1, 2')\n" + at_import(FAILURES[failure][0]))
    plugin_site("t-greeter", GREETER_PLUGIN)

    assert main(["plugins", "--json"]) == 0

    out, err = capsys.readouterr()
    records = {record["distribution"]: record for record in json.loads(out)}
    assert records["t-greeter"]["status"] == "ok"
    if failure == "print":
        assert records["t-failing"]["status"] == "ok"
        assert err.startswith("refiners plugins: warning: refiners plugin t-failing 1.0 ")
        assert len(err.splitlines()) == 1
    else:
        assert records["t-failing"]["status"] == "error"
        described = FAILURES[failure][1].split(";")[0]
        assert records["t-failing"]["error"].startswith(f"import failed: {described}")
        assert "it printed: [1, 2" in records["t-failing"]["error"]
        assert err == ""


@pytest.mark.parametrize("failure", [*FAILURES, "print"])
@pytest.mark.parametrize("where", ["import", "hook"])
def test_commands_still_run_with_their_exit_code_whatever_a_plugin_does(
    plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str], failure: str, where: str
) -> None:
    statement = "print('plugin output')" if failure == "print" else FAILURES[failure][0]
    plugin_site("t-failing", at_import(statement) if where == "import" else in_hook(statement))
    plugin_site("t-greeter", GREETER_PLUGIN)

    assert main(["t-hello", "--name", "refiners"]) == 3

    out, err = capsys.readouterr()
    assert out == "hello refiners\n"
    (warning,) = err.splitlines()
    assert warning.startswith("refiners: warning: refiners plugin t-failing 1.0 (entry point `t-failing = ")


def test_refiners_plugins_table_shows_the_warnings_of_the_registry(
    plugin_site: AddPlugin,
    installed_plugins: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin_site("t-printer", PRINTS)
    monkeypatch.setenv("REFINERS_DISABLE_PLUGINS", "t-typo")

    assert main(["plugins"]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    warnings = [line for line in lines if line.startswith("warning: ")]
    (row,) = [line for line in lines if line.startswith("t-printer ")]
    assert row.endswith("  ok")
    assert lines[-len(warnings) :] == warnings  # the warnings come after the table
    assert warnings[0].startswith("warning: refiners plugin t-printer 1.0 (entry point `t-printer = ")
    assert warnings[1:] == [
        f"warning: REFINERS_DISABLE_PLUGINS names 't-typo', which matches no installed plugin (installed: "
        f"{installed_plugins()}; use a distribution or entry point name)"
    ]


def test_unknown_disabled_name_is_one_warning_line_on_stderr_of_other_commands(
    plugin_site: AddPlugin,
    installed_plugins: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin_site("t-greeter", GREETER_PLUGIN)
    monkeypatch.setenv("REFINERS_DISABLE_PLUGINS", "t-greter")

    assert main(["t-hello"]) == 3

    assert capsys.readouterr().err == (
        "refiners: warning: REFINERS_DISABLE_PLUGINS names 't-greter', which matches no installed plugin "
        f"(installed: {installed_plugins()}; use a distribution or entry point name)\n"
    )
