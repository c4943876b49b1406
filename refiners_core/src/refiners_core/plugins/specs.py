"""What plugins register: small frozen descriptions of adapters, models, solvers, CLI commands and options.

A plugin builds these objects and hands them to the `register` callback of a hook (see `hookspecs`); the
registry then exposes them by name, e.g. `registry().adapters["lora"].create(target, rank=4)`.

Every field that takes a callable or a class also takes a `Reference("module:attribute")` (or the plain string),
imported on first use: a plugin that registers only references imports neither its implementation nor torch when
the registry loads (`refiners --help`, `refiners plugins`). `refiners_core.plugins.resolve(spec.factory)` gives the
object itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refiners_core.plugins.references import Reference, resolve

if TYPE_CHECKING:
    from refiners_core.fluxion.adapters import Adapter


def check_name(kind: str, name: object) -> None:
    """Raise if `name` cannot name a registered `kind` (a non-empty string without whitespace)."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a string, got {type(name).__name__} {name!r}")
    if not name or any(char.isspace() for char in name):
        raise ValueError(f"{kind} name must be non-empty and contain no whitespace, got {name!r}")


def _check_callable(kind: str, name: str, role: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{kind} {name!r}: {role} must be callable, got {type(value).__name__} {value!r}")


def _referenced(spec: object, kind: str, name: str, *roles: str) -> None:
    """Replace the `"module:attribute"` strings of the fields `roles` of the frozen `spec` by References."""
    for role in roles:
        value = getattr(spec, role)
        if isinstance(value, str):
            try:
                object.__setattr__(spec, role, Reference(value))
            except ValueError as error:
                raise ValueError(f"{kind} {name!r}: {role}: {error}") from None


def _is_class_tuple(value: object) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) > 0  # pyright: ignore[reportUnknownArgumentType]
        and all(isinstance(item, type | Reference) for item in value)  # pyright: ignore[reportUnknownVariableType]
    )


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter a plugin offers under `name`.

    `factory(target=layer, **options)` builds the adapter around `layer` (it does not inject it).
    `targets`, when given, lists the layer classes the adapter can wrap; `create` checks it.
    Raises TypeError or ValueError on construction if the name or the factory is invalid.
    """

    name: str
    factory: Callable[..., Adapter[Any]]
    summary: str = ""
    targets: tuple[type[Any] | Reference, ...] | None = None

    def __post_init__(self) -> None:
        check_name("adapter", self.name)
        _referenced(self, "adapter", self.name, "factory")
        _check_callable("adapter", self.name, "factory", self.factory)
        if isinstance(self.targets, tuple):
            try:
                targets = tuple(Reference(t) if isinstance(t, str) else t for t in self.targets)  # pyright: ignore[reportUnnecessaryIsInstance]
            except ValueError as error:
                raise ValueError(f"adapter {self.name!r}: targets: {error}") from None
            object.__setattr__(self, "targets", targets)
        if self.targets is not None and not _is_class_tuple(self.targets):
            raise TypeError(
                f"adapter {self.name!r}: targets must be a non-empty tuple of classes, got {self.targets!r}"
            )

    def create(self, target: Any, **options: Any) -> Adapter[Any]:
        """Build the adapter around `target` with `factory(target=target, **options)`.

        Raises TypeError, naming the adapter and the target's type, if `target` is not one of `targets`.
        """
        if self.targets is not None:
            targets = tuple(resolve(t) for t in self.targets)
            if not isinstance(target, targets):
                accepted = ", ".join(t.__name__ for t in targets)
                raise TypeError(f"adapter {self.name!r} cannot wrap a {type(target).__name__}: it accepts {accepted}")
        return self.factory(target=target, **options)


@dataclass(frozen=True)
class ModelSpec:
    """A model a plugin offers under `name`; what `loader` takes and returns is up to the plugin's docs.

    `demo`, when given, is an offline demonstration that `refiners demo` runs after its own. It is called with
    keyword arguments `seed` (int), `lora_rank` (int), `output_dir` (a `pathlib.Path` where it may write files)
    and `quiet` (bool: no model trees); it builds the model with random weights (no download), prints what it
    does, and returns its checks as `(description, passed)` pairs, which `refiners demo` lists with its own.

    A model that `refiners generate` can run gives `detect`, `default_size` and `generate`, and may give the others:

    - `detect(source)`: `source` is `--model` as the user gave it (a local folder or file, or a hub id). Returns a
      short phrase saying what shows `source` holds this kind of model ("model_index.json's _class_name is
      'StableDiffusionXLPipeline'"), or None. It reads only small files (indexes, configs, a safetensors header:
      see `refiners_core.model_kinds`), never weights, never downloads, and raises nothing.
    - `default_size`: the `(width, height)` generated when neither a size nor an init image is given.
    - `generate(model, *, prompt, negative_prompt, make_solver, size, guidance, seed, init_image, after_step)`: one
      image from `model` (what `loader(source, device=..., dtype=...)` returned), as a `PIL.Image.Image`.
      `make_solver(**settings)` builds the solver the user chose, with the number of steps and the first step
      already set (`settings` override them, e.g. `first_inference_step` for a refiner); the model gives it its own
      settings (e.g. its timestep spacing) when it is set on it. `size` is `(width, height)`; `init_image` (a
      `PIL.Image.Image` or None) starts image-to-image from the solver's first step; `after_step(step, latents)` is
      called after each denoising step and may raise to stop. With a `refiner`, it also receives `refiner=` (what
      the refiner's loader returned) and `refiner_fraction=` (the last part of the steps the refiner runs, in
      (0, 1)). Raises ValueError for latents the autoencoder cannot decode or a split of the steps that leaves a
      model none.
    - `default_guidance`: the classifier-free guidance scale generated with when none is given.
    - `solver_defaults`: the solver settings of the model's published scheduler config (keyword arguments of a
      `Solver`, e.g. `{"timestep_spacing": "leading"}`), for the checks made before the model is loaded.
    - `refiner`: the name of the registered model (without `generate`) that `--refiner` loads and runs after this
      one on the last steps.
    - `generate_batch(model, *, prompts, negative_prompts, seeds, init_images, make_solver, size, guidance,
      after_step)`: several images at once, as a list of `PIL.Image.Image` in the order of `prompts` (with
      `negative_prompts`, `seeds` and `init_images` one per image; an init image may be None), as `generate` makes
      each of them alone: image i's noise is drawn from its own `seeds[i]`, so what is batched with it changes it
      only within float rounding. Called only without a mask or a refiner, and with a deterministic solver;
      `refiners generate --batch-size` calls `generate` once per image for a kind without it.
    """

    name: str
    loader: Callable[..., Any]
    summary: str = ""
    demo: Callable[..., Sequence[tuple[str, bool]]] | None = None
    detect: Callable[[str], str | None] | None = None
    default_size: tuple[int, int] | None = None
    generate: Callable[..., Any] | None = None
    default_guidance: float | None = None
    solver_defaults: Mapping[str, Any] | None = None
    refiner: str | None = None
    generate_batch: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        check_name("model", self.name)
        if self.refiner is not None:
            check_name(f"model {self.name!r}: refiner", self.refiner)
        guidance = self.default_guidance
        if guidance is not None and (
            isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance < float("inf")  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise TypeError(f"model {self.name!r}: default_guidance must be a finite number >= 0, got {guidance!r}")
        if self.solver_defaults is not None and not isinstance(self.solver_defaults, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"model {self.name!r}: solver_defaults must be a mapping, got {self.solver_defaults!r}")
        _referenced(self, "model", self.name, "loader", "demo", "detect", "generate", "generate_batch")
        _check_callable("model", self.name, "loader", self.loader)
        for role in ("demo", "detect", "generate", "generate_batch"):
            if (value := getattr(self, role)) is not None:
                _check_callable("model", self.name, role, value)
        size = self.default_size
        if size is not None and not (
            isinstance(size, tuple)  # pyright: ignore[reportUnnecessaryIsInstance]
            and len(size) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise TypeError(
                f"model {self.name!r}: default_size must be a (width, height) of positive ints, got {size!r}"
            )


@dataclass(frozen=True)
class SolverSpec:
    """A diffusion solver a plugin offers under `name`; `factory(**options)` builds it."""

    name: str
    factory: Callable[..., Any]
    summary: str = ""

    def __post_init__(self) -> None:
        check_name("solver", self.name)
        _referenced(self, "solver", self.name, "factory")
        _check_callable("solver", self.name, "factory", self.factory)


@dataclass(frozen=True)
class GenerateOptionSpec:
    """An option a plugin adds to generation commands (e.g. `refiners generate --lora FILE[:SCALE]`).

    The generation command adds `flag` to its parser (repeatable, taking one value each time) and, once the
    model is loaded, calls `apply(model, values)` with every value given for the flag, in order; `apply` is
    not called when the flag is absent. `validate`, when given, is called as `validate(values)` right after the
    command line is parsed, before any model is loaded: it checks what it can without the model (the values'
    syntax, that files exist, are readable and of the right format, that numbers are finite) and raises an
    exception naming the value at fault. `models`, when given, restricts the option to those registered model
    names (`None`: every model). The flag names the option in the registry.
    Raises TypeError or ValueError on construction if the flag, `apply`, `validate` or `models` is invalid.
    """

    flag: str
    apply: Callable[[Any, list[str]], None]
    help: str = ""
    metavar: str | None = None
    models: tuple[str, ...] | None = None
    validate: Callable[[list[str]], None] | None = None

    def __post_init__(self) -> None:
        check_name("generate option", self.flag)
        if not self.flag.startswith("--") or len(self.flag) < 3 or self.flag[2] == "-":
            raise ValueError(f"generate option flag must look like '--name', got {self.flag!r}")
        _referenced(self, "generate option", self.flag, "apply", "validate")
        _check_callable("generate option", self.flag, "apply", self.apply)
        if self.validate is not None:
            _check_callable("generate option", self.flag, "validate", self.validate)
        if self.models is not None:
            if not isinstance(self.models, tuple) or not self.models:  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError(
                    f"generate option {self.flag!r}: models must be None or a non-empty tuple of model names, "
                    f"got {self.models!r}"
                )
            for model in self.models:
                check_name("model", model)

    @property
    def name(self) -> str:
        """The flag, which is the option's name in the registry."""
        return self.flag

    def applies_to(self, model: str) -> bool:
        """Whether the option is offered for the registered model named `model`."""
        return self.models is None or model in self.models


@dataclass(frozen=True)
class CommandSpec:
    """A `refiners NAME` subcommand.

    `configure(parser)` adds the command's arguments to its own `argparse.ArgumentParser`; it is only
    called when the command runs (or its `--help` is asked), never for `refiners --help`.
    `run(args)` does the work and returns the exit code (None means 0).
    """

    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str = ""
    configure: Callable[[argparse.ArgumentParser], None] | None = None

    def __post_init__(self) -> None:
        check_name("command", self.name)
        if self.name.startswith("-"):
            raise ValueError(f"command name must not start with '-', got {self.name!r}")
        _referenced(self, "command", self.name, "run", "configure")
        _check_callable("command", self.name, "run", self.run)
        if self.configure is not None:
            _check_callable("command", self.name, "configure", self.configure)


class CommandRegistrar:
    """The `cli` object handed to `refiners_register_commands`: a plugin adds subcommands with `add_command`."""

    def __init__(self, register: Callable[[CommandSpec], None]) -> None:
        self._register = register

    def add_command(
        self,
        name: str,
        run: Callable[[argparse.Namespace], int | None],
        *,
        help: str = "",
        configure: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> None:
        """Add `refiners NAME`: `configure(parser)` declares its arguments, `run(args)` returns the exit code.

        Raises TypeError or ValueError if the name or the callables are invalid, ValueError if this plugin
        already added a command with that name.
        """
        self._register(CommandSpec(name, run, help, configure))
