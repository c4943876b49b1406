"""The refiners plugin system: installed distributions add adapters, models, solvers, CLI commands and options.

A plugin is a module with `@hookimpl` functions (see `refiners_core.plugins.hookspecs` for every hook and its
contract), declared by one entry point in the `refiners` group of its distribution's `pyproject.toml`.
`registry()` loads the installed plugins once and gives access to what they registered; `refiners plugins`
shows the same information, including the plugins that failed.
"""

from refiners_core.plugins.compatibility import PLUGIN_API_VERSION
from refiners_core.plugins.hookspecs import hookimpl, hookspec
from refiners_core.plugins.kinds import KINDS, RegistryKind
from refiners_core.plugins.loader import (
    PluginError,
    PluginRecord,
    RefinersPluginWarning,
    Registry,
    SpecTable,
    registry,
    reset_registry,
)
from refiners_core.plugins.references import Reference, resolve
from refiners_core.plugins.specs import (
    AdapterSpec,
    CommandRegistrar,
    CommandSpec,
    GenerateOptionSpec,
    ModelSpec,
    SolverSpec,
)

__all__ = [
    "KINDS",
    "PLUGIN_API_VERSION",
    "AdapterSpec",
    "CommandRegistrar",
    "CommandSpec",
    "GenerateOptionSpec",
    "ModelSpec",
    "PluginError",
    "PluginRecord",
    "Reference",
    "RefinersPluginWarning",
    "Registry",
    "RegistryKind",
    "SolverSpec",
    "SpecTable",
    "hookimpl",
    "hookspec",
    "registry",
    "resolve",
    "reset_registry",
]
