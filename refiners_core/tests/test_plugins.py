"""The plugin registry, with distributions made visible through real metadata on `sys.path` (no pip)."""

from __future__ import annotations

import collections
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from refiners_core.plugins import (
    AdapterSpec,
    CommandSpec,
    GenerateOptionSpec,
    ModelSpec,
    PluginError,
    PluginRecord,
    Reference,
    RefinersPluginWarning,
    Registry,
    SolverSpec,
    registry,
    reset_registry,
    resolve,
)

AddPlugin = Callable[..., str]  # the `plugin_site` fixture of conftest.py

EVERYTHING = """
    from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, ModelSpec, SolverSpec, hookimpl

    def scale(target, factor=2):
        return ("scaled", target, factor)

    def run(args):
        return 0

    @hookimpl
    def refiners_register_adapters(register):
        register(AdapterSpec("t-scale", scale, summary="Scale", targets=(int,)))

    @hookimpl
    def refiners_register_models(register):
        register(ModelSpec("t-model", lambda path: path))

    @hookimpl
    def refiners_register_solvers(register):
        register(SolverSpec("t-solver", dict))

    @hookimpl
    def refiners_register_commands(cli):
        cli.add_command("t-command", run, help="Say hello")

    @hookimpl
    def refiners_register_generate_options(register):
        register(GenerateOptionSpec("--t-style", lambda model, values: None, help="Style", models=("t-model",)))
"""


def adapter_plugin(name: str) -> str:
    return f"""
    from refiners_core.plugins import AdapterSpec, hookimpl

    @hookimpl
    def refiners_register_adapters(register):
        register(AdapterSpec({name!r}, lambda target: target))
    """


def record_of(loaded: Registry, distribution: str) -> PluginRecord:
    (record,) = [record for record in loaded.plugins if record.distribution == distribution]
    return record


def test_registry_collects_adapters_models_solvers_commands_and_options_of_a_plugin(plugin_site: AddPlugin) -> None:
    entry_point = plugin_site("t-everything", EVERYTHING, version="2.5")

    loaded = registry()

    assert loaded.adapters["t-scale"].create(3) == ("scaled", 3, 2)
    assert loaded.adapters["t-scale"].create(3, factor=5) == ("scaled", 3, 5)
    assert loaded.models["t-model"].loader("x") == "x"
    assert loaded.solvers["t-solver"].factory(a=1) == {"a": 1}
    assert loaded.commands["t-command"].help == "Say hello"
    assert loaded.generate_options["--t-style"].applies_to("t-model")
    assert not loaded.generate_options["--t-style"].applies_to("other")
    assert record_of(loaded, "t-everything") == PluginRecord(
        distribution="t-everything",
        version="2.5",
        entry_point=entry_point,
        registered={
            "adapters": ("t-scale",),
            "models": ("t-model",),
            "solvers": ("t-solver",),
            "commands": ("t-command",),
            "generate_options": ("--t-style",),
        },
        error=None,
        status="ok",
    )


def test_registry_is_cached_until_reload_or_reset(plugin_site: AddPlugin) -> None:
    plugin_site("t-one", adapter_plugin("t-one"))

    first = registry()

    assert registry() is first
    assert registry(reload=True) is not first
    reloaded = registry()
    reset_registry()
    assert registry() is not reloaded


def test_plugins_load_in_distribution_then_entry_point_order(plugin_site: AddPlugin) -> None:
    plugin_site("t-b", adapter_plugin("t-b1"), entry_point="z")
    plugin_site("t-a", adapter_plugin("t-a1"), entry_point="y")

    distributions = [record.distribution for record in registry().plugins if record.distribution.startswith("t-")]

    assert distributions == ["t-a", "t-b"]


def test_unknown_adapter_name_error_lists_registered_names(plugin_site: AddPlugin) -> None:
    plugin_site("t-one", adapter_plugin("t-one"))

    with pytest.raises(KeyError, match="no adapter named 't-missing' is registered.*t-one"):
        registry().adapters["t-missing"]


def test_plugin_that_fails_to_import_is_recorded_and_others_still_load(plugin_site: AddPlugin) -> None:
    entry_point = plugin_site("t-broken", "import refiners_test_dependency_that_does_not_exist\n")
    plugin_site("t-good", adapter_plugin("t-good"))

    with pytest.warns(RefinersPluginWarning, match=f"t-broken 1.0 \\(entry point `{entry_point}`\\)"):
        loaded = registry()

    broken = record_of(loaded, "t-broken")
    assert broken.status == "error"
    assert (
        broken.error
        == "import failed: ModuleNotFoundError: No module named 'refiners_test_dependency_that_does_not_exist'"
    )
    assert isinstance(broken.exception, ModuleNotFoundError)
    assert record_of(loaded, "t-good").status == "ok"
    assert "t-good" in loaded.adapters


def test_plugin_warning_points_at_the_caller_of_registry(plugin_site: AddPlugin) -> None:
    plugin_site("t-broken", "raise RuntimeError('boom')\n")

    with pytest.warns(RefinersPluginWarning) as caught:
        registry()

    assert caught[0].filename == __file__


def test_hook_that_raises_keeps_none_of_its_plugins_registrations(plugin_site: AddPlugin) -> None:
    plugin_site(
        "t-raising",
        """
        from refiners_core.plugins import AdapterSpec, hookimpl

        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("t-half", lambda target: target))

        @hookimpl
        def refiners_register_models(register):
            raise RuntimeError("cannot describe models")
        """,
    )
    plugin_site("t-good", adapter_plugin("t-good"))

    with pytest.warns(RefinersPluginWarning, match="t-raising"):
        loaded = registry()

    record = record_of(loaded, "t-raising")
    assert record.status == "error"
    assert record.error == "refiners_register_models raised RuntimeError: cannot describe models"
    assert record.adapters == ()
    assert "t-half" not in loaded.adapters
    assert "t-good" in loaded.adapters


def test_name_conflict_keeps_the_first_plugin_and_names_both_distributions(plugin_site: AddPlugin) -> None:
    plugin_site("t-first", adapter_plugin("t-shared"), version="1.2")
    plugin_site(
        "t-second",
        """
        from refiners_core.plugins import AdapterSpec, hookimpl

        @hookimpl
        def refiners_register_adapters(register):
            register(AdapterSpec("t-shared", lambda target: "second"))
            register(AdapterSpec("t-own", lambda target: target))
        """,
        version="3.4",
    )

    with pytest.warns(RefinersPluginWarning, match="t-shared") as caught:
        loaded = registry()

    second = record_of(loaded, "t-second")
    assert second.status == "error"
    assert second.error is not None
    for text in ("'t-shared'", "t-first 1.2", "t-second 3.4"):
        assert text in second.error
        assert text in str(caught[0].message)
    assert second.adapters == ("t-own",)
    assert record_of(loaded, "t-first").adapters == ("t-shared",)
    assert loaded.adapters["t-shared"].create(1) == 1


def test_plugin_command_named_like_a_builtin_command_is_a_conflict(plugin_site: AddPlugin) -> None:
    plugin_site(
        "t-commands",
        """
        from refiners_core.plugins import hookimpl

        @hookimpl
        def refiners_register_commands(cli):
            cli.add_command("plugins", lambda args: 1)
        """,
    )

    with pytest.warns(RefinersPluginWarning, match="refiners-core .* \\(built-in\\)"):
        loaded = registry()

    assert record_of(loaded, "t-commands").status == "error"
    assert loaded.commands["plugins"].run is not None
    assert loaded.commands["plugins"].help.startswith("List installed plugins")


@pytest.mark.parametrize("disable", ["t-off", "T_Off", "off", " t-off , off ,,"])
def test_disabled_plugins_are_listed_but_not_imported(
    plugin_site: AddPlugin, monkeypatch: pytest.MonkeyPatch, disable: str
) -> None:
    plugin_site("t-off", "raise RuntimeError('imported although disabled')\n", entry_point="off")
    plugin_site("t-on", adapter_plugin("t-on"))
    monkeypatch.setenv("REFINERS_DISABLE_PLUGINS", disable)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RefinersPluginWarning)
        loaded = registry()

    record = record_of(loaded, "t-off")
    assert (record.status, record.error) == ("disabled", None)
    assert "refiners_test_t_off_plugin" not in sys.modules
    assert "t-on" in loaded.adapters


@pytest.mark.parametrize(
    ("disable", "unknown"),
    [("nothing-here", ["nothing-here"]), (" off , Typo_Plugin ", ["Typo_Plugin"]), ("a,b,a", ["a", "b"])],
)
def test_disabled_names_that_match_no_installed_plugin_are_warned_about(
    plugin_site: AddPlugin,
    installed_plugins: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    disable: str,
    unknown: list[str],
) -> None:
    plugin_site("t-off", adapter_plugin("t-off"), entry_point="off")
    monkeypatch.setenv("REFINERS_DISABLE_PLUGINS", disable)
    installed = installed_plugins()
    assert "t-off" in installed.split(", ")

    with pytest.warns(RefinersPluginWarning) as caught:
        loaded = registry()

    expected = [
        f"REFINERS_DISABLE_PLUGINS names {name!r}, which matches no installed plugin (installed: {installed}; "
        "use a distribution or entry point name)"
        for name in unknown
    ]
    assert [str(warning.message) for warning in caught] == expected
    assert list(loaded.warnings) == expected
    assert caught[0].filename == __file__
    assert all(record.status != "error" for record in loaded.plugins)


def test_strict_mode_raises_plugin_error_chained_from_the_original(plugin_site: AddPlugin) -> None:
    plugin_site("t-broken", "raise RuntimeError('boom')\n", entry_point="broken")

    with pytest.raises(PluginError, match="t-broken 1.0 \\(entry point `broken = ") as raised:
        registry(strict=True)

    assert isinstance(raised.value.__cause__, RuntimeError)
    assert raised.value.distribution == "t-broken"
    assert raised.value.entry_point == "broken = refiners_test_t_broken_plugin"


def test_strict_mode_from_the_environment_also_applies_to_a_cached_registry(
    plugin_site: AddPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin_site("t-broken", "raise RuntimeError('boom')\n")
    with pytest.warns(RefinersPluginWarning):
        registry()
    monkeypatch.setenv("REFINERS_STRICT_PLUGINS", "1")

    with pytest.raises(PluginError, match="t-broken") as raised:
        registry()

    assert isinstance(raised.value.__cause__, RuntimeError)


def test_strict_mode_raises_on_name_conflicts(plugin_site: AddPlugin) -> None:
    plugin_site("t-first", adapter_plugin("t-shared"))
    plugin_site("t-second", adapter_plugin("t-shared"))

    with pytest.raises(PluginError, match="t-second 1.0 .*'t-shared'.*t-first 1.0"):
        registry(strict=True)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            "@hookimpl\ndef refiners_register_adapters(register):\n    return [1]\n",
            "refiners_register_adapters returned [1]; hooks must call their callback and return None",
        ),
        (
            "@hookimpl\ndef refiners_register_adapter(register):\n    pass\n",
            "ValueError: refiners_register_adapter is not a refiners hook",
        ),
        (
            "@hookimpl\ndef refiners_register_adapters(register):\n    register('lora')\n",
            "refiners_register_adapters raised TypeError: register() takes AdapterSpec objects, got str 'lora'",
        ),
        (
            "@hookimpl\ndef refiners_register_models(register):\n"
            "    register(ModelSpec('m', dict))\n    register(ModelSpec('m', dict))\n",
            "refiners_register_models raised ValueError: model 'm' is registered twice by this plugin",
        ),
        (
            "@hookimpl\ndef refiners_register_adapters(registr):\n    pass\n",
            "refiners_register_adapters takes arguments the hook does not offer: registr (it offers: register)",
        ),
        (
            "@hookimpl\ndef refiners_register_adapters(register):\n    register(AdapterSpec('two words', dict))\n",
            "ValueError: adapter name must be non-empty and contain no whitespace, got 'two words'",
        ),
    ],
    ids=["returns-a-value", "misspelled-hook", "wrong-spec-type", "same-name-twice", "unknown-argument", "bad-name"],
)
def test_plugin_mistakes_are_reported_on_the_plugin(plugin_site: AddPlugin, body: str, error: str) -> None:
    header = "from refiners_core.plugins import AdapterSpec, ModelSpec, hookimpl\n"
    plugin_site("t-mistaken", header + body)

    with pytest.warns(RefinersPluginWarning):
        record = record_of(registry(), "t-mistaken")

    assert record.status == "error"
    assert record.error is not None and error in record.error


def test_optional_unknown_hook_is_ignored(plugin_site: AddPlugin) -> None:
    plugin_site(
        "t-future",
        """
        from refiners_core.plugins import hookimpl

        @hookimpl(optionalhook=True)
        def refiners_register_something_new(register):
            pass
        """,
    )

    assert record_of(registry(), "t-future").status == "ok"


def test_hook_implementation_may_take_no_arguments(plugin_site: AddPlugin) -> None:
    plugin_site(
        "t-quiet",
        """
        from refiners_core.plugins import hookimpl

        @hookimpl
        def refiners_register_adapters():
            pass
        """,
    )

    assert record_of(registry(), "t-quiet").status == "ok"


def test_record_json_has_the_documented_keys() -> None:
    record = PluginRecord("d", "1", "e = m", registered={"adapters": ("a",)}, error="x", status="error")

    assert record.to_json() == {
        "distribution": "d",
        "version": "1",
        "entry_point": "e = m",
        "adapters": ["a"],
        "models": [],
        "solvers": [],
        "commands": [],
        "generate_options": [],
        "error": "x",
        "status": "error",
    }


# Specs


def identity(target: object) -> Any:
    return target


class Layer:
    pass


class OtherLayer:
    pass


def test_adapter_spec_create_passes_target_and_options_to_the_factory() -> None:
    calls: list[tuple[object, dict[str, object]]] = []

    def factory(target: object, **options: object) -> object:
        calls.append((target, options))
        return "adapter"

    layer = Layer()
    spec = AdapterSpec("scale", factory, targets=(Layer,))  # pyright: ignore[reportArgumentType]

    assert spec.create(layer, rank=4) == "adapter"
    assert calls == [(layer, {"rank": 4})]


def test_adapter_spec_create_rejects_a_target_of_the_wrong_type() -> None:
    spec = AdapterSpec("scale", identity, targets=(Layer,))

    with pytest.raises(TypeError, match="adapter 'scale' cannot wrap a OtherLayer: it accepts Layer"):
        spec.create(OtherLayer())


@pytest.mark.parametrize("name", ["", "two words", "tab\tname", "new\nline"])
def test_spec_names_must_be_non_empty_without_whitespace(name: str) -> None:
    for build in (
        lambda: AdapterSpec(name, identity),
        lambda: ModelSpec(name, dict),
        lambda: SolverSpec(name, dict),
        lambda: CommandSpec(name, lambda args: 0),
    ):
        with pytest.raises(ValueError, match="name must be non-empty and contain no whitespace"):
            build()


def test_spec_rejects_a_factory_that_is_not_callable() -> None:
    with pytest.raises(TypeError, match="adapter 'scale': factory must be callable"):
        AdapterSpec("scale", 42)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="adapter 'scale': factory: 'not a function' is not a reference"):
        AdapterSpec("scale", "not a function")  # pyright: ignore[reportArgumentType]


def test_model_spec_demo_must_be_callable() -> None:
    with pytest.raises(TypeError, match="model 'm': demo must be callable"):
        ModelSpec("m", dict, demo=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="model 'm': demo: 'run' is not a reference"):
        ModelSpec("m", dict, demo="run")  # pyright: ignore[reportArgumentType]


def test_adapter_spec_targets_must_be_a_tuple_of_classes() -> None:
    with pytest.raises(TypeError, match="targets must be a non-empty tuple of classes"):
        AdapterSpec("scale", identity, targets=Layer)  # pyright: ignore[reportArgumentType]


def test_command_names_cannot_look_like_options() -> None:
    with pytest.raises(ValueError, match="must not start with '-'"):
        CommandSpec("--all", lambda args: 0)


def option_plugin(flag: str, raises: bool = False) -> str:
    failure = "\n        raise RuntimeError('cannot describe models')" if raises else ""
    return f"""
    from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, hookimpl

    @hookimpl
    def refiners_register_generate_options(register):
        register(GenerateOptionSpec({flag!r}, lambda model, values: None))

    @hookimpl
    def refiners_register_models(register):
        pass{failure}
    """


def test_generate_option_flag_conflict_keeps_the_first_plugin_and_names_both(plugin_site: AddPlugin) -> None:
    plugin_site("t-first", option_plugin("--t-shared"), version="1.2")
    plugin_site("t-second", option_plugin("--t-shared"), version="3.4")

    with pytest.warns(RefinersPluginWarning, match="generate option name '--t-shared' conflicts"):
        loaded = registry()

    second = record_of(loaded, "t-second")
    assert second.status == "error" and second.error is not None
    assert "t-first 1.2" in second.error and "t-second 3.4" in second.error
    assert second.generate_options == ()
    assert record_of(loaded, "t-first").generate_options == ("--t-shared",)


def test_generate_options_of_a_failing_plugin_are_not_kept(plugin_site: AddPlugin) -> None:
    plugin_site("t-raising", option_plugin("--t-half", raises=True))

    with pytest.warns(RefinersPluginWarning, match="t-raising"):
        loaded = registry()

    assert record_of(loaded, "t-raising").generate_options == ()
    assert "--t-half" not in loaded.generate_options
    with pytest.raises(KeyError, match="no generate option named '--t-half' is registered"):
        loaded.generate_options["--t-half"]


@pytest.mark.parametrize("flag", ["lora", "-l", "--", "---lora", "--two words"])
def test_generate_option_flag_must_look_like_a_long_option(flag: str) -> None:
    with pytest.raises(ValueError, match="generate option"):
        GenerateOptionSpec(flag, lambda model, values: None)


def test_generate_option_spec_checks_apply_and_models() -> None:
    with pytest.raises(TypeError, match="generate option '--lora': apply must be callable"):
        GenerateOptionSpec("--lora", 3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="models must be None or a non-empty tuple"):
        GenerateOptionSpec("--lora", lambda model, values: None, models="sd15")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="model name must be non-empty"):
        GenerateOptionSpec("--lora", lambda model, values: None, models=("sd 15",))
    spec = GenerateOptionSpec("--lora", lambda model, values: None, metavar="FILE[:SCALE]", models=("sd15",))
    assert (spec.name, spec.applies_to("sd15"), spec.applies_to("sam")) == ("--lora", True, False)


def test_model_spec_checks_what_generation_needs() -> None:
    with pytest.raises(TypeError, match="model 'm': detect must be callable"):
        ModelSpec("m", dict, detect=["model_index.json"])  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="model 'm': generate must be callable"):
        ModelSpec("m", dict, generate=42)  # pyright: ignore[reportArgumentType]
    for size in [(0, 512), (512,), [512, 512], (512.0, 512), (True, 8)]:
        with pytest.raises(TypeError, match=r"model 'm': default_size must be a \(width, height\) of positive ints"):
            ModelSpec("m", dict, default_size=size)  # pyright: ignore[reportArgumentType]
    spec = ModelSpec("m", dict, detect=lambda source: None, default_size=(768, 512), generate=lambda model: None)
    assert spec.default_size == (768, 512) and spec.detect is not None and spec.detect("folder") is None


def test_model_spec_checks_its_default_guidance_solver_defaults_and_refiner() -> None:
    for guidance in [-1.0, float("nan"), float("inf"), True, "5"]:
        with pytest.raises(TypeError, match="model 'm': default_guidance must be a finite number >= 0"):
            ModelSpec("m", dict, default_guidance=guidance)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="model 'm': solver_defaults must be a mapping"):
        ModelSpec("m", dict, solver_defaults=[("timestep_spacing", "leading")])  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="model 'm': refiner name must be non-empty and contain no whitespace"):
        ModelSpec("m", dict, refiner="m refiner")
    spec = ModelSpec("m", dict, default_guidance=5, solver_defaults={"timestep_spacing": "leading"}, refiner="m-r")
    assert (spec.default_guidance, spec.solver_defaults, spec.refiner) == (5, {"timestep_spacing": "leading"}, "m-r")


def test_model_spec_architecture_is_a_callable_or_a_reference() -> None:
    with pytest.raises(TypeError, match="model 'm': architecture must be callable"):
        ModelSpec("m", dict, architecture=3)  # pyright: ignore[reportArgumentType]
    spec = ModelSpec("m", dict, architecture=Reference("collections:OrderedDict"))
    assert spec.architecture is not None and resolve(spec.architecture) is collections.OrderedDict
