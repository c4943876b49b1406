"""A plugin made for another refiners-core is listed as incompatible, with both versions, and never imported."""

from __future__ import annotations

import json
from collections.abc import Callable

import importlib_metadata
import pytest

from refiners_core.cli import main
from refiners_core.plugins import PLUGIN_API_VERSION, PluginError, RefinersPluginWarning, registry
from refiners_core.plugins.compatibility import core_requirement, incompatibility

AddPlugin = Callable[..., str]  # the `plugin_site` fixture of conftest.py

CORE_VERSION = importlib_metadata.version("refiners-core")
# Importing this module fails the test: an incompatible plugin must not be imported.
EXPLODES_ON_IMPORT = "raise RuntimeError('an incompatible plugin was imported')\n"
ADAPTER_PLUGIN = (
    "from refiners_core.plugins import AdapterSpec, hookimpl\n"
    "@hookimpl\n"
    "def refiners_register_adapters(register):\n"
    "    register(AdapterSpec('t-compatible', dict))\n"
)


def test_a_plugin_whose_core_range_excludes_the_installed_core_is_listed_incompatible_and_not_imported(
    plugin_site: AddPlugin,
) -> None:
    plugin_site("t-old", EXPLODES_ON_IMPORT, requires=("refiners-core<0.0.1", "torch>=2"))

    with pytest.warns(RefinersPluginWarning, match="t-old"):
        loaded = registry()

    record = next(record for record in loaded.plugins if record.distribution == "t-old")
    assert record.status == "incompatible"
    assert record.error == (
        f"incompatible: it requires refiners-core<0.0.1, but refiners-core {CORE_VERSION} (plugin API "
        f"{PLUGIN_API_VERSION}) is installed; install a version of the plugin made for this core, or a core in its "
        "range"
    )
    assert record.registered == {key: () for key in record.registered}


def test_a_plugin_whose_core_range_holds_the_installed_core_loads(plugin_site: AddPlugin) -> None:
    plugin_site("t-current", ADAPTER_PLUGIN, requires=(f"refiners-core>={CORE_VERSION},<1000", "torch>=2"))

    loaded = registry()

    assert next(record for record in loaded.plugins if record.distribution == "t-current").status == "ok"
    assert "t-compatible" in loaded.adapters


def test_a_core_requirement_behind_an_extra_does_not_count(plugin_site: AddPlugin) -> None:
    plugin_site("t-extra", ADAPTER_PLUGIN, requires=('refiners-core<0.0.1; extra == "old"',))

    assert next(record for record in registry().plugins if record.distribution == "t-extra").status == "ok"


def test_strict_mode_raises_for_an_incompatible_plugin(plugin_site: AddPlugin) -> None:
    plugin_site("t-future", EXPLODES_ON_IMPORT, requires=("Refiners_Core>=1000",))

    with pytest.raises(PluginError, match=r"t-future 1\.0 .*requires refiners-core>=1000, but refiners-core"):
        registry(strict=True)


def test_an_unreadable_core_requirement_is_an_error_on_the_plugin(plugin_site: AddPlugin) -> None:
    plugin_site("t-garbled", EXPLODES_ON_IMPORT, requires=("refiners-core >>> 1",))

    with pytest.warns(RefinersPluginWarning):
        record = next(record for record in registry().plugins if record.distribution == "t-garbled")

    assert record.status == "error"
    assert record.error is not None
    assert record.error.startswith("cannot tell which refiners-core it needs: its requirement 'refiners-core >>> 1'")


def test_refiners_plugins_shows_the_incompatibility(plugin_site: AddPlugin, capsys: pytest.CaptureFixture[str]) -> None:
    plugin_site("t-old", EXPLODES_ON_IMPORT, requires=("refiners-core<0.0.1",))

    assert main(["plugins"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("t-old "))
    assert f"incompatible: it requires refiners-core<0.0.1, but refiners-core {CORE_VERSION}" in line

    assert main(["plugins", "--json"]) == 0
    listed = {entry["distribution"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["t-old"]["status"] == "incompatible"


@pytest.mark.parametrize(
    ("requires", "core", "compatible"),
    [
        (["refiners-core>=0.1,<0.2"], "0.1.5", True),
        (["refiners-core>=0.1,<0.2"], "0.2.0", False),
        (["refiners-core>=0.1"], "0.2.0.dev3", True),  # a development core is not refused
        (["refiners-core>=0.1"], "0.1.0+local", True),
        (["refiners-core~=0.1.0"], "0.2.0", False),
        (["refiners-core==0.1.*"], "0.1.9", True),
        (["refiners-core"], "9.9", True),  # no range: any core
        (["torch>=2"], "0.1.0", True),  # no requirement on the core
        (["refiners-core<0.1"], "?", True),  # the core's own version unknown: not judged
    ],
)
def test_incompatibility_reads_the_range_as_pip_does(requires: list[str], core: str, compatible: bool) -> None:
    assert (incompatibility(requires, core) is None) is compatible


def test_core_requirement_ignores_other_distributions_and_extras() -> None:
    requirement = core_requirement(["torch>=2", 'refiners-core<0.1; extra == "x"', "refiners_core>=0.1"])

    assert requirement is not None and str(requirement.specifier) == ">=0.1"
