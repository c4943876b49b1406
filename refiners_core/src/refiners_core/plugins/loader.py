"""Find, load and record the installed plugins (entry point group `refiners`).

Each entry point is loaded on its own, in a deterministic order, and each of its hooks is called on its own,
so a failure is attributed to the right distribution and never stops the others. What a plugin registers is
collected first and committed only once all its hooks succeeded.

A plugin's code (its import and its hooks) runs isolated from the program that loads it:

- Whatever it raises, `SystemExit` from `sys.exit(0)` or argparse and any other `BaseException` included,
  fails that plugin only: it is recorded with status "error" and its distribution. `KeyboardInterrupt` alone
  propagates, so Ctrl-C still interrupts.
- What it prints to `sys.stdout` or `sys.stderr` is captured, so it can neither corrupt a command's output
  (`refiners plugins --json`) nor pass for the program's own messages: a plugin that fails has its output
  summarized in its error, one that loads has it reported as a warning.
- It sees `sys.argv` reduced to the program name (`[sys.argv[0]]`), restored afterwards: the arguments belong
  to the program (the `refiners` command, a user's script), so a plugin that parses them at import neither
  fails on options it does not know nor changes what the program parses.

Environment variables:

- `REFINERS_DISABLE_PLUGINS=a,b`: do not import these plugins (entry point or distribution names); they are
  listed with status "disabled". A name that matches no installed plugin is warned about.
- `REFINERS_STRICT_PLUGINS=1`: raise `PluginError` on the first plugin error instead of warning.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import importlib_metadata
import pluggy

from refiners_core.plugins import hookspecs
from refiners_core.plugins.compatibility import CORE_DISTRIBUTION, incompatibility
from refiners_core.plugins.kinds import KIND_KEYS, KINDS, RegistryKind
from refiners_core.plugins.specs import (
    AdapterSpec,
    CommandSpec,
    GenerateOptionSpec,
    ModelSpec,
    SolverSpec,
)

ENTRY_POINT_GROUP = "refiners"
DISABLE_ENV = "REFINERS_DISABLE_PLUGINS"
STRICT_ENV = "REFINERS_STRICT_PLUGINS"

# Modules of refiners-core itself that implement hooks (the built-in CLI commands). They are loaded before any
# installed plugin, so their names win conflicts, and they are not listed among `Registry.plugins`.
_BUILTIN_PLUGINS = ("refiners_core.cli",)

S = TypeVar("S")
Status = Literal["ok", "error", "incompatible", "disabled"]


class RefinersPluginWarning(UserWarning):
    """A plugin failed to load, one of its hooks failed, it registered a name already taken or printed while
    loading, or `REFINERS_DISABLE_PLUGINS` names no installed plugin."""


class PluginError(RuntimeError):
    """Raised instead of warning in strict mode; names the plugin's distribution and entry point."""

    def __init__(self, message: str, *, distribution: str, entry_point: str) -> None:
        super().__init__(message)
        self.distribution = distribution
        self.entry_point = entry_point


@dataclass(frozen=True)
class PluginRecord:
    """What happened to one `refiners` entry point: where it comes from, what it registered, what failed."""

    distribution: str
    version: str
    entry_point: str
    """As written in the distribution's metadata: `lora = refiners_lora.plugin`."""
    registered: Mapping[str, tuple[str, ...]] = field(default_factory=dict[str, tuple[str, ...]])
    """The names it registered, by kind (`KINDS`' keys: "adapters", "generate_options"...); a kind it registered
    nothing of may be left out. `adapters`, `models`... read it."""
    error: str | None = None
    """One line, problems separated by "; ", e.g. `import failed: ModuleNotFoundError: No module named 'x'`."""
    status: Status = "ok"
    """"ok", "error" (see `error`; names that did not conflict are still registered), "incompatible" (its
    requirement on refiners-core excludes the installed core, see `error`; it was not imported) or "disabled"."""
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The exception behind `error`, if there was one (a name conflict has none)."""

    def __post_init__(self) -> None:
        unknown = set(self.registered) - set(KIND_KEYS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)} (known: {', '.join(KIND_KEYS)})")
        # Every kind present, as a tuple, so that equal records compare equal however they were built.
        object.__setattr__(self, "registered", {key: tuple(self.registered.get(key, ())) for key in KIND_KEYS})

    def names(self, kind: str) -> tuple[str, ...]:
        """The names of kind `kind` ("adapters", "generate_options"...) this plugin registered."""
        return self.registered[kind]

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.registered["adapters"]

    @property
    def models(self) -> tuple[str, ...]:
        return self.registered["models"]

    @property
    def solvers(self) -> tuple[str, ...]:
        return self.registered["solvers"]

    @property
    def commands(self) -> tuple[str, ...]:
        return self.registered["commands"]

    @property
    def generate_options(self) -> tuple[str, ...]:
        """Flags added to generation commands, e.g. `--lora`."""
        return self.registered["generate_options"]

    def to_json(self) -> dict[str, Any]:
        """The record as written by `refiners plugins --json`."""
        return {
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            **{key: list(names) for key, names in self.registered.items()},
            "error": self.error,
            "status": self.status,
        }


class SpecTable(Mapping[str, S], Generic[S]):
    """Read-only name -> spec mapping whose KeyError lists the registered names."""

    def __init__(self, kind: str, specs: dict[str, S]) -> None:
        self._kind = kind
        self._specs = specs

    def __getitem__(self, name: str) -> S:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise KeyError(
                f"no {self._kind} named {name!r} is registered (registered: {known}); "
                "`refiners plugins` shows what is installed"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"SpecTable({self._kind!r}, {list(self._specs)!r})"


@dataclass(frozen=True)
class Registry:
    """Everything the installed plugins registered, by kind and name, and one `PluginRecord` per entry point."""

    tables: Mapping[str, SpecTable[Any]]
    """One table per kind of `KINDS`, by its key: `tables["adapters"]["lora"]`. The properties below read it."""
    plugins: tuple[PluginRecord, ...]
    warnings: tuple[str, ...] = ()
    """Problems that leave every plugin's status as it is, one line each: a plugin printed while loading, a
    name in `REFINERS_DISABLE_PLUGINS` matches no installed plugin. They are also warned about."""

    @property
    def adapters(self) -> SpecTable[AdapterSpec]:
        return self.tables["adapters"]

    @property
    def models(self) -> SpecTable[ModelSpec]:
        return self.tables["models"]

    @property
    def solvers(self) -> SpecTable[SolverSpec]:
        return self.tables["solvers"]

    @property
    def commands(self) -> SpecTable[CommandSpec]:
        """Built-in commands first, then those of plugins."""
        return self.tables["commands"]

    @property
    def generate_options(self) -> SpecTable[GenerateOptionSpec]:
        """Options of generation commands, by flag (`--lora`)."""
        return self.tables["generate_options"]


_KIND_BY_KEY = {kind.key: kind for kind in KINDS}

_cached: Registry | None = None


def registry(*, reload: bool = False, strict: bool | None = None) -> Registry:
    """The registry of installed plugins, loaded on first use and cached.

    `reload=True` loads the plugins again. `strict` (default: the `REFINERS_STRICT_PLUGINS` environment
    variable) raises `PluginError`, chained from the original exception, for the first plugin that failed;
    otherwise failures are recorded on the plugin's `PluginRecord` and warned about with
    `RefinersPluginWarning`.
    """
    global _cached
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    if reload or _cached is None:
        _cached = None
        _cached = _load(strict=strict)
    elif strict:
        for record in _cached.plugins:
            if record.status == "error":
                raise _plugin_error(record, record.error or "", record.exception)
    return _cached


def reset_registry() -> None:
    """Forget the cached registry; the next `registry()` call loads the plugins again."""
    global _cached
    _cached = None


# Loading


class _Loader:
    """Collects what each plugin registers and commits it once the plugin is done."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.tables: dict[str, dict[str, Any]] = {key: {} for key in KIND_KEYS}
        self.owners: dict[tuple[str, str], str] = {}  # (kind, name) -> who registered it, for conflict messages
        self.warnings: list[str] = []

    def load_builtin(self, module_name: str) -> None:
        owner = f"refiners-core {_version('refiners-core')} (built-in)"
        collected = self.collect(importlib.import_module(module_name), module_name)
        for kind, specs in collected.items():
            for spec in specs:
                self.tables[kind][spec.name] = spec
                self.owners[kind, spec.name] = owner

    def load_entry_point(self, entry_point: importlib_metadata.EntryPoint, disabled: list[str]) -> PluginRecord:
        distribution, version = _distribution(entry_point)
        ep_text = f"{entry_point.name} = {entry_point.value}"
        record = PluginRecord(distribution, version, ep_text)
        if any(_names(name, entry_point, distribution) for name in disabled):
            return PluginRecord(distribution, version, ep_text, status="disabled")
        try:
            reason = _incompatibility(entry_point)
        except ValueError as error:
            return self.fail(record, f"cannot tell which refiners-core it needs: {error}", error)
        if reason is not None:
            return self.fail(record, reason, None, status="incompatible")
        output = io.StringIO()
        try:
            with _isolated(output):
                plugin = entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            return self.fail(record, f"import failed: {_describe(error)}{_printed(output)}", error)
        try:
            with _isolated(output):
                collected = self.collect(plugin, f"{distribution}:{entry_point.name}")
        except KeyboardInterrupt:
            raise
        except _HookFailed as error:
            return self.fail(record, f"{error}{_printed(output)}", error.__cause__)
        except BaseException as error:
            return self.fail(record, f"{_describe(error)}{_printed(output)}", error)
        if output.getvalue().strip():
            self.warn(
                f"refiners plugin {distribution} {version} (entry point `{ep_text}`): printed while loading, which "
                f"plugins must not do (the output was discarded): {_one_line(output.getvalue())}",
                stacklevel=5,  # warn < load_entry_point < _load < registry < the caller of registry()
            )

        owner = f"{distribution} {version} (entry point `{ep_text}`)"
        registered: dict[str, list[str]] = {kind: [] for kind in self.tables}
        errors: list[str] = []
        for kind, specs in collected.items():
            for spec in specs:
                taken_by = self.owners.get((kind, spec.name))
                if taken_by is not None:
                    errors.append(
                        f"{_KIND_BY_KEY[kind].singular} name {spec.name!r} conflicts: it is already registered by "
                        f"{taken_by}, which keeps it; {distribution} {version} cannot register it too"
                    )
                    continue
                self.tables[kind][spec.name] = spec
                self.owners[kind, spec.name] = owner
                registered[kind].append(spec.name)
        record = PluginRecord(
            distribution, version, ep_text, registered={kind: tuple(names) for kind, names in registered.items()}
        )
        for message in errors:
            record = self.fail(record, message, None)
        return record

    def collect(self, plugin: object, plugin_name: str) -> dict[str, list[Any]]:
        """Call each hook of `plugin` and return what it registered, by kind; raise on any problem."""
        try:
            self.pm.register(plugin, name=plugin_name)
        except pluggy.PluginValidationError as error:
            raise ValueError(_validation_message(error)) from error
        for caller in self.pm.get_hookcallers(plugin) or []:
            if not caller.has_spec() and not any(i.optionalhook for i in caller.get_hookimpls() if i.plugin is plugin):
                raise ValueError(
                    f"{caller.name} is not a refiners hook (misspelled, or written for a newer refiners-core? "
                    "mark it @hookimpl(optionalhook=True) to make it optional)"
                )
        collected: dict[str, list[Any]] = {kind: [] for kind in self.tables}
        for hook_name, kwargs in _hook_arguments(collected).items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.hookwrapper or impl.wrapper:
                    raise ValueError(f"{hook_name}: refiners hooks do not support wrapper hookimpls")
                try:
                    result = impl.function(**{name: kwargs[name] for name in impl.argnames})
                except KeyboardInterrupt:
                    raise
                except BaseException as error:
                    raise _HookFailed(f"{hook_name} raised {_describe(error)}") from error
                if result is not None:
                    raise ValueError(f"{hook_name} returned {result!r}; hooks must call their callback and return None")
        return collected

    def fail(
        self, record: PluginRecord, message: str, error: BaseException | None, *, status: Status = "error"
    ) -> PluginRecord:
        if self.strict:
            raise _plugin_error(record, message, error)
        self.warn(
            f"refiners plugin {record.distribution} {record.version} (entry point `{record.entry_point}`): {message}",
            stacklevel=6,  # warn < fail < load_entry_point < _load < registry < the caller of registry()
            noted=False,  # the plugin's record holds it
        )
        error_text = message if record.error is None else f"{record.error}; {message}"
        return PluginRecord(
            record.distribution,
            record.version,
            record.entry_point,
            registered=record.registered,
            error=error_text,
            status=status,
            exception=record.exception or error,
        )

    def warn(self, message: str, *, stacklevel: int, noted: bool = True) -> None:
        """Warn with `RefinersPluginWarning`, and keep `message` for `Registry.warnings` unless `noted=False`."""
        if noted:
            self.warnings.append(message)
        warnings.warn(message, RefinersPluginWarning, stacklevel=stacklevel)


class _HookFailed(Exception):
    """A hook implementation raised; the original exception is the cause."""


def _load(*, strict: bool) -> Registry:
    importlib.invalidate_caches()  # pick up distributions installed since the interpreter started
    loader = _Loader(strict=strict)
    for module_name in _BUILTIN_PLUGINS:
        loader.load_builtin(module_name)
    disabled = _disabled()
    entry_points = _entry_points()
    records: list[PluginRecord] = []
    for entry_point in entry_points:  # a loop, not a comprehension: warnings' stack levels count on it
        records.append(loader.load_entry_point(entry_point, disabled))
    for name in disabled:
        if not any(_names(name, entry_point, _distribution(entry_point)[0]) for entry_point in entry_points):
            installed = ", ".join(sorted({record.distribution for record in records})) or "none"
            loader.warn(
                f"{DISABLE_ENV} names {name!r}, which matches no installed plugin "
                f"(installed: {installed}; use a distribution or entry point name)",
                stacklevel=4,  # warn < _load < registry < the caller of registry()
            )
    tables = loader.tables
    return Registry(
        tables={kind.key: SpecTable(kind.singular, tables[kind.key]) for kind in KINDS},
        plugins=tuple(records),
        warnings=tuple(loader.warnings),
    )


def _hook_arguments(collected: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """The keyword arguments of each hook, wired to `collected` (one list per kind)."""

    def register_to(kind: RegistryKind) -> Callable[[Any], None]:
        def register(spec: Any) -> None:
            if not isinstance(spec, kind.spec_type):
                raise TypeError(
                    f"register() takes {kind.spec_type.__name__} objects, got {type(spec).__name__} {spec!r}"
                )
            if any(other.name == spec.name for other in collected[kind.key]):
                raise ValueError(f"{kind.singular} {spec.name!r} is registered twice by this plugin")
            collected[kind.key].append(spec)

        return register

    return {
        kind.hook: {kind.argument: kind.wrap(register_to(kind)) if kind.wrap else register_to(kind)} for kind in KINDS
    }


def _validation_message(error: pluggy.PluginValidationError) -> str:
    """pluggy's refusal of a hook implementation, said as what the plugin author must change."""
    message = " ".join(str(error).split())
    hook = re.search(r"for hook '(\w+)'", message)
    arguments = re.search(r"Argument\(s\) \{(.*?)\}", message)
    if hook is None or arguments is None or hook.group(1) not in _HOOK_ARGUMENTS:
        return f"invalid hook implementation: {message}"
    unknown = ", ".join(sorted(name.strip(" '\"") for name in arguments.group(1).split(",")))
    offered = ", ".join(_HOOK_ARGUMENTS[hook.group(1)])
    return f"{hook.group(1)} takes arguments the hook does not offer: {unknown} (it offers: {offered})"


_HOOK_ARGUMENTS = {kind.hook: (kind.argument,) for kind in KINDS}


def _incompatibility(entry_point: importlib_metadata.EntryPoint) -> str | None:
    """Why the distribution of `entry_point` cannot run with the installed refiners-core, or None."""
    distribution = entry_point.dist
    if distribution is None:
        return None
    return incompatibility(distribution.requires, _version(CORE_DISTRIBUTION))


def _entry_points() -> list[importlib_metadata.EntryPoint]:
    entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)  # pyright: ignore[reportUnknownMemberType]
    return sorted(entry_points, key=lambda ep: (_normalize(_distribution(ep)[0]), ep.name))


def _distribution(entry_point: importlib_metadata.EntryPoint) -> tuple[str, str]:
    """Name and version of the distribution that declares `entry_point`, even when its metadata is broken."""
    try:
        dist = entry_point.dist
        name, version = (dist.name, dist.version) if dist is not None else (None, None)
    except Exception:
        name, version = None, None
    return name or "<unknown distribution>", version or "?"


def _disabled() -> list[str]:
    """The names listed in `REFINERS_DISABLE_PLUGINS`, in order, without duplicates."""
    names = (name.strip() for name in os.environ.get(DISABLE_ENV, "").split(","))
    return list(dict.fromkeys(name for name in names if name))


def _names(name: str, entry_point: importlib_metadata.EntryPoint, distribution: str) -> bool:
    """Whether `name`, as written in `REFINERS_DISABLE_PLUGINS`, names this entry point or its distribution."""
    return entry_point.name in (name, _normalize(name)) or _normalize(name) == _normalize(distribution)


@contextlib.contextmanager
def _isolated(output: io.StringIO) -> Generator[None]:
    """Run a plugin's code with its prints captured into `output` and `sys.argv` reduced to the program name."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            yield
    finally:
        sys.argv = argv


def _printed(output: io.StringIO) -> str:
    """`; it printed: ...` with the captured output on one line, or "" if there was none."""
    text = _one_line(output.getvalue())
    return f"; it printed: {text}" if text else ""


def _one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace collapsed, cut after `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def _normalize(distribution: str) -> str:
    """PEP 503 normalization, so `refiners_lora` and `Refiners-LoRA` both name `refiners-lora`."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _version(distribution: str) -> str:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return "?"


def _describe(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _plugin_error(record: PluginRecord, message: str, error: BaseException | None) -> PluginError:
    plugin_error = PluginError(
        f"refiners plugin {record.distribution} {record.version} (entry point `{record.entry_point}`): {message}",
        distribution=record.distribution,
        entry_point=record.entry_point,
    )
    plugin_error.__cause__ = error
    return plugin_error
