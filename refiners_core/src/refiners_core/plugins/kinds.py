"""The kinds of things a plugin registers, in one table.

Each kind names its hook, the argument the hook receives, the spec class it takes and the key under which the
registry, `PluginRecord`, `refiners plugins` and its `--json` output list it. Everything else (the loader's
bookkeeping, the records, the tables, the CLI listing) is derived from `KINDS`, so a new kind is one line here
(and its hook spec in `refiners_core.plugins.hookspecs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refiners_core.plugins.specs import (
    AdapterSpec,
    CommandRegistrar,
    CommandSpec,
    GenerateOptionSpec,
    ModelSpec,
    SolverSpec,
)


@dataclass(frozen=True)
class RegistryKind:
    """One kind of registered thing.

    - `key`: its name in the registry (`registry().tables[key]`), in `PluginRecord.registered` and in the JSON of
      `refiners plugins --json` ("generate_options").
    - `singular`: how messages name one of them ("generate option").
    - `hook`: the hook that registers them; it receives `argument`, which is the `register(spec)` callback
      itself, or `wrap(register)` when the hook takes a richer object (`CommandRegistrar` for commands).
    - `spec_type`: the class `register` accepts.
    """

    key: str
    singular: str
    hook: str
    spec_type: type
    argument: str = "register"
    wrap: Callable[[Callable[[Any], None]], Any] | None = None

    @property
    def label(self) -> str:
        """The plural as `refiners plugins` prints it ("generate options")."""
        return self.key.replace("_", " ")


KINDS: tuple[RegistryKind, ...] = (
    RegistryKind("adapters", "adapter", "refiners_register_adapters", AdapterSpec),
    RegistryKind("models", "model", "refiners_register_models", ModelSpec),
    RegistryKind("solvers", "solver", "refiners_register_solvers", SolverSpec),
    RegistryKind("commands", "command", "refiners_register_commands", CommandSpec, "cli", CommandRegistrar),
    RegistryKind("generate_options", "generate option", "refiners_register_generate_options", GenerateOptionSpec),
)
"""Every kind, in the order `refiners plugins` lists them."""

KIND_KEYS: tuple[str, ...] = tuple(kind.key for kind in KINDS)
