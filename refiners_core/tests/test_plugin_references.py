"""Specs take `"module:attribute"` references, imported on first use, so that plugins register without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from refiners_core.plugins import AdapterSpec, ModelSpec, Reference, SolverSpec, registry, resolve

AddPlugin = Callable[..., str]  # the `plugin_site` fixture of refiners_core.testing


def test_a_reference_imports_its_object_on_first_use_only() -> None:
    reference = Reference("json:dumps")

    assert reference.resolve() is json.dumps
    assert reference({"a": 1}) == '{"a": 1}'
    assert reference == Reference("json:dumps") and hash(reference) == hash(Reference("json:dumps"))
    assert resolve(reference) is json.dumps and resolve("json:loads") is json.loads and resolve(len) is len


@pytest.mark.parametrize("text", ["json", "json:", ":dumps", "json:dumps:x", "json.:dumps", "2json:dumps", ""])
def test_a_malformed_reference_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not a reference: write 'package.module:attribute'"):
        Reference(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("refiners_no_such_module:x", "cannot resolve 'refiners_no_such_module:x': No module named"),
        ("json:no_such_function", "cannot resolve 'json:no_such_function': json has no attribute 'no_such_function'"),
    ],
)
def test_a_reference_to_nothing_fails_on_use_naming_it(text: str, message: str) -> None:
    reference = Reference(text)

    with pytest.raises(ImportError, match=message):
        reference()


def test_specs_keep_strings_as_references_and_check_targets_on_use() -> None:
    spec = AdapterSpec("scaled", factory="collections:OrderedDict", targets=("builtins:int",))  # type: ignore[arg-type]

    assert spec.factory == Reference("collections:OrderedDict")
    assert spec.create(3) == {"target": 3}
    with pytest.raises(TypeError, match="adapter 'scaled' cannot wrap a str: it accepts int"):
        spec.create("three")
    assert ModelSpec("m", loader="json:loads").loader("[1]") == [1]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="solver 's': factory: 'not a reference' is not a reference"):
        SolverSpec("s", factory="not a reference")  # type: ignore[arg-type]


def test_a_plugin_registering_references_loads_without_importing_their_modules(plugin_site: AddPlugin) -> None:
    plugin_site(
        "t-lazy",
        """
        from refiners_core.plugins import AdapterSpec, Reference, hookimpl

        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("t-lazy", factory=Reference("refiners_t_lazy_heavy:Factory")))
        """,
    )

    loaded = registry()

    assert "refiners_t_lazy_heavy" not in sys.modules
    with pytest.raises(ImportError, match="cannot resolve 'refiners_t_lazy_heavy:Factory'"):
        loaded.adapters["t-lazy"].create(1)


def test_the_core_and_its_registry_load_without_torch() -> None:
    """With every plugin disabled, importing refiners_core and loading the registry (the built-in commands) must not
    import torch: `refiners --help` and `refiners plugins` start in a fraction of a second."""
    script = (
        "import importlib_metadata, os, sys\n"
        "names = {ep.dist.name for ep in importlib_metadata.entry_points(group='refiners') if ep.dist}\n"
        "os.environ['REFINERS_DISABLE_PLUGINS'] = ','.join(names)\n"
        "import refiners_core, refiners_core.testing.pytest_plugin\n"
        "from refiners_core.plugins import registry\n"
        "registry()\n"
        "print(sorted(name for name in ('torch', 'numpy', 'PIL', 'safetensors') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
