"""Third-party plugin distributions, built from their own `pyproject.toml` and installed with pip.

The distributions are installed once for the module (`pip install --no-deps`, no network) into the running
interpreter's environment, and uninstalled afterwards. The `refiners` console script is run in a subprocess,
as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.plugins import PluginRecord, Registry, registry, reset_registry

pytestmark = pytest.mark.pip

ACME = {
    "refiners_test_acme/__init__.py": "",
    "refiners_test_acme/plugin.py": '''
        """A third-party plugin: a scaling adapter, a model and a command."""

        import refiners_core.fluxion as fl
        from refiners_core.plugins import AdapterSpec, ModelSpec, hookimpl


        class Scale(fl.Chain, fl.Adapter[fl.Linear]):
            def __init__(self, target: fl.Linear, factor: float = 2.0) -> None:
                with self.setup_adapter(target):
                    super().__init__(target, fl.Lambda(lambda x: x * factor))


        def greet(args):
            print(f"hello {args.name}")


        def configure(parser):
            parser.add_argument("--name", default="world")


        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("acme-scale", Scale, summary="Scale a Linear's output", targets=(fl.Linear,)))


        @hookimpl
        def refiners_register_models(register):
            register(ModelSpec("acme-tiny", lambda: fl.Linear(2, 2)))


        @hookimpl
        def refiners_register_commands(cli):
            cli.add_command("acme-hello", greet, help="Say hello from acme", configure=configure)
    ''',
}
BROKEN = {
    "refiners_test_broken/__init__.py": "",
    "refiners_test_broken/plugin.py": "import refiners_test_dependency_that_does_not_exist\n",
}
CLASH = {
    "refiners_test_clash/__init__.py": "",
    "refiners_test_clash/plugin.py": """
        from refiners_core.plugins import AdapterSpec, hookimpl


        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("acme-scale", lambda target: target))
            register(AdapterSpec("clash-own", lambda target: target))
    """,
}
RAISING = {
    "refiners_test_raising/__init__.py": "",
    "refiners_test_raising/plugin.py": """
        from refiners_core.plugins import AdapterSpec, hookimpl


        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("raising-adapter", lambda target: target))


        @hookimpl
        def refiners_register_models(register):
            raise RuntimeError("model table is corrupt")
    """,
}
# distribution -> (entry point name, files); sorted by distribution name, which is also the load order
DISTRIBUTIONS = {
    "refiners-test-acme": ("acme", ACME),
    "refiners-test-broken": ("broken", BROKEN),
    "refiners-test-clash": ("clash", CLASH),
    "refiners-test-raising": ("raising", RAISING),
}
MODULES = [name.replace("-", "_") for name in DISTRIBUTIONS]
JSON_KEYS = {
    "distribution",
    "version",
    "entry_point",
    "adapters",
    "models",
    "solvers",
    "commands",
    "generate_options",
    "error",
    "status",
}


def write_project(root: Path, distribution: str, entry_point: str, files: dict[str, str]) -> Path:
    package = distribution.replace("-", "_")
    project = root / distribution
    project.mkdir()
    (project / "pyproject.toml").write_text(
        textwrap.dedent(f"""
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "{distribution}"
            version = "0.7.1"
            dependencies = ["refiners-core"]

            [project.entry-points.refiners]
            {entry_point} = "{package}.plugin"

            [tool.hatch.build.targets.wheel]
            packages = ["{package}"]
        """)
    )
    for name, source in files.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return project


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Build and pip-install the test distributions once for this module; uninstall them afterwards."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this environment")
    root = tmp_path_factory.mktemp("distributions")
    projects = [str(write_project(root, name, ep, files)) for name, (ep, files) in DISTRIBUTIONS.items()]
    # Without hatchling here, pip builds in an isolated environment and fetches it from the configured index.
    offline = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation", "--no-index"]
    pip("install", "--quiet", "--no-deps", *offline, *projects)
    reset_registry()
    try:
        yield
    finally:
        pip("uninstall", "--quiet", "--yes", *DISTRIBUTIONS)
        for module in list(sys.modules):
            if module.split(".")[0] in MODULES:
                del sys.modules[module]
        reset_registry()


@pytest.fixture
def loaded(installed: None, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.delenv("REFINERS_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("REFINERS_STRICT_PLUGINS", raising=False)
    with pytest.warns(Warning):  # the broken, clashing and raising plugins are warned about
        return registry(reload=True)


def refiners(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the `refiners` console script of this environment."""
    script = shutil.which("refiners", path=os.path.dirname(sys.executable))
    assert script is not None, "the `refiners` console script is not installed next to the interpreter"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REFINERS_")} | env
    return subprocess.run([script, *args], capture_output=True, text=True, env=environment, timeout=120)


def by_distribution(records: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {record["distribution"]: record for record in records}


def test_installed_adapter_is_created_through_the_registry_and_wraps_its_target(loaded: Registry) -> None:
    linear = fl.Linear(4, 4)
    model = fl.Chain(linear)
    x = torch.randn(2, 4)
    before = model(x)

    adapter = loaded.adapters["acme-scale"].create(linear, factor=3.0).inject()
    scaled = model(x)
    adapter.eject()

    assert torch.equal(scaled, before * 3.0)
    assert torch.equal(model(x), before)
    assert loaded.adapters["acme-scale"].summary == "Scale a Linear's output"
    with pytest.raises(TypeError, match="adapter 'acme-scale' cannot wrap a Chain: it accepts Linear"):
        loaded.adapters["acme-scale"].create(model)


def test_installed_plugins_are_recorded_with_distribution_version_and_entry_point(loaded: Registry) -> None:
    records = {record.distribution: record for record in loaded.plugins}

    assert records["refiners-test-acme"] == PluginRecord(
        "refiners-test-acme",
        "0.7.1",
        "acme = refiners_test_acme.plugin",
        registered={"adapters": ("acme-scale",), "models": ("acme-tiny",), "commands": ("acme-hello",)},
    )
    assert records["refiners-test-broken"].status == "error"
    assert records["refiners-test-broken"].error == (
        "import failed: ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'"
    )


def test_installed_plugin_with_a_clashing_name_keeps_its_other_names(loaded: Registry) -> None:
    clash = next(record for record in loaded.plugins if record.distribution == "refiners-test-clash")

    assert clash.status == "error"
    assert clash.adapters == ("clash-own",)
    assert clash.error is not None
    assert "'acme-scale'" in clash.error
    assert "refiners-test-acme 0.7.1" in clash.error
    assert "refiners-test-clash 0.7.1" in clash.error
    assert loaded.adapters["acme-scale"].summary == "Scale a Linear's output"


def test_installed_plugin_whose_hook_raises_registers_nothing(loaded: Registry) -> None:
    raising = next(record for record in loaded.plugins if record.distribution == "refiners-test-raising")

    assert raising.error == "refiners_register_models raised RuntimeError: model table is corrupt"
    assert raising.adapters == ()
    assert "raising-adapter" not in loaded.adapters


def test_refiners_plugins_lists_working_and_broken_plugins_and_exits_0(installed: None) -> None:
    result = refiners("plugins")

    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "0.7.1" in lines["refiners-test-acme"]
    assert "acme = refiners_test_acme.plugin" in lines["refiners-test-acme"]
    assert "adapters: acme-scale; models: acme-tiny; commands: acme-hello" in lines["refiners-test-acme"]
    assert lines["refiners-test-acme"].endswith("  ok")
    assert "broken = refiners_test_broken.plugin" in lines["refiners-test-broken"]
    assert "error: import failed: ModuleNotFoundError" in lines["refiners-test-broken"]
    assert "error: adapter name 'acme-scale' conflicts" in lines["refiners-test-clash"]
    assert "error: refiners_register_models raised RuntimeError" in lines["refiners-test-raising"]


def test_refiners_plugins_json_lists_every_entry_point_with_the_documented_keys(installed: None) -> None:
    result = refiners("plugins", "--json")

    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert all(set(record) == JSON_KEYS for record in records)
    plugins = by_distribution(records)
    assert plugins["refiners-test-acme"] == {
        "distribution": "refiners-test-acme",
        "version": "0.7.1",
        "entry_point": "acme = refiners_test_acme.plugin",
        "adapters": ["acme-scale"],
        "models": ["acme-tiny"],
        "solvers": [],
        "commands": ["acme-hello"],
        "generate_options": [],
        "error": None,
        "status": "ok",
    }
    broken = plugins["refiners-test-broken"]
    assert (broken["status"], broken["adapters"]) == ("error", [])
    assert broken["error"] == (
        "import failed: ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'"
    )


def test_refiners_help_lists_plugin_commands_and_the_plugin_command_runs(installed: None) -> None:
    help_result = refiners("--help")
    run_result = refiners("acme-hello", "--name", "refiners")

    assert help_result.returncode == 0, help_result.stderr
    assert "acme-hello" in help_result.stdout
    assert "Say hello from acme [refiners-test-acme]" in " ".join(help_result.stdout.split())
    assert run_result.returncode == 0, run_result.stderr
    assert run_result.stdout == "hello refiners\n"
    assert "refiners: warning: refiners plugin refiners-test-broken 0.7.1" in run_result.stderr


def test_disabled_installed_plugin_is_listed_as_disabled_and_not_imported(installed: None) -> None:
    result = refiners("plugins", "--json", REFINERS_DISABLE_PLUGINS="refiners-test-broken,raising,clash")

    plugins = by_distribution(json.loads(result.stdout))
    assert result.returncode == 0
    assert (plugins["refiners-test-broken"]["status"], plugins["refiners-test-broken"]["error"]) == ("disabled", None)
    assert plugins["refiners-test-raising"]["status"] == "disabled"
    assert plugins["refiners-test-acme"]["status"] == "ok"


def test_strict_mode_makes_the_cli_fail_naming_the_broken_distribution(installed: None) -> None:
    result = refiners("plugins", REFINERS_STRICT_PLUGINS="1")
    verbose = refiners("--verbose", "plugins", REFINERS_STRICT_PLUGINS="1")

    assert result.returncode == 2
    assert result.stderr.startswith("refiners: error: refiners plugin refiners-test-broken 0.7.1 (entry point `broken")
    assert "ModuleNotFoundError" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert verbose.returncode == 2
    assert "PluginError: refiners plugin refiners-test-broken 0.7.1" in verbose.stderr
    assert "Traceback" in verbose.stderr and "ModuleNotFoundError" in verbose.stderr  # the original error is chained
