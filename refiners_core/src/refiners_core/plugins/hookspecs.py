"""Every hook a refiners plugin can implement.

A plugin is a module with `@hookimpl` functions named after the hooks below, made known by one line in its
distribution's `pyproject.toml`::

    [project.entry-points.refiners]
    acme = "acme_refiners.plugin"

and, in `acme_refiners/plugin.py`::

    from refiners_core.plugins import AdapterSpec, hookimpl

    @hookimpl
    def refiners_register_adapters(register):
        register(AdapterSpec("acme-scale", factory=ScaleAdapter, summary="Scale a layer's output"))

Rules shared by every hook:

- Hooks are named `refiners_...` and are called with keyword arguments only; an implementation may accept
  any subset of the arguments of its spec, so new arguments can be added without breaking plugins.
- Each hook is called once per plugin, the first time `refiners_core.plugins.registry()` is used (by the
  `refiners` CLI, or by library code looking something up), in a deterministic order: plugins sorted by
  distribution name, then entry point name.
- A hook does its work by calling back with objects and returns None. Returning a value is an error.
- Registration is all or nothing per plugin: if any of a plugin's hooks raises, nothing that plugin
  registered is kept, the plugin is reported by `refiners plugins` with the error, and every other plugin
  still loads. With `REFINERS_STRICT_PLUGINS=1` the error is raised instead (meant for plugin authors).
- Names are global per kind: when two plugins register the same adapter (model, solver, command) name or the
  same generate option flag, the first in the order above keeps it and the other is reported with an error
  naming both distributions.
- Hooks must be quick and free of side effects: no downloads, no reading of weights, no building of
  models, no printing. The plugin module is imported by every `refiners` invocation (`--help` included),
  so keep what it imports to what the specs need.
- The plugin's import and its hooks run isolated (see `refiners_core.plugins.loader`): anything they raise,
  `SystemExit` (`sys.exit`, argparse) and other `BaseException`s included, fails this plugin only, with its
  distribution and error recorded; only `KeyboardInterrupt` propagates. What they print is captured and
  reported as a warning, never mixed into a command's output. They see `sys.argv` as `[sys.argv[0]]`: the
  command line belongs to the program loading the plugin, and a plugin reads its options through the
  parser its command's `configure` receives, never from `sys.argv`.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from refiners_core.plugins.specs import AdapterSpec, CommandRegistrar, GenerateOptionSpec, ModelSpec, SolverSpec

PROJECT_NAME = "refiners"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register the adapters this plugin offers.

    Called once per plugin when the registry is first loaded.

    :param register: call it with one `AdapterSpec` per adapter. The spec's factory is later called as
        `factory(target=layer, **options)` and must return an `Adapter` wrapping `layer` without
        injecting it; set `targets` to the layer classes it accepts so misuse fails with a clear error.

    Must not build adapters or touch any model here: only describe them. Registering the same name twice
    from one plugin raises ValueError; registering a name another plugin already took is reported as a
    conflict on this plugin.
    """


@hookspec
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the models this plugin can load.

    Called once per plugin when the registry is first loaded.

    :param register: call it with one `ModelSpec` per model. The loader is called later, by users, with
        the arguments the plugin documents (typically a local path or hub id, a device and a dtype). A model that
        `refiners generate` can run also gives `detect` (whether a folder, cached hub id or file holds this kind,
        from its small files only), `default_size` and `generate` (one image from the loaded model); the loader is
        then called as `loader(source, device=..., dtype=...)`. See `ModelSpec` for their contracts.

    Must not download or read weights here: loaders do that when called. Same naming rules as adapters.
    """


@hookspec
def refiners_register_solvers(register: Callable[[SolverSpec], None]) -> None:
    """Register the diffusion solvers (noise schedulers) this plugin offers.

    Called once per plugin when the registry is first loaded.

    :param register: call it with one `SolverSpec` per solver; `factory(**options)` builds the solver.

    Must not build solvers here. Same naming rules as adapters.
    """


@hookspec
def refiners_register_commands(cli: CommandRegistrar) -> None:
    """Add `refiners` subcommands.

    Called once per plugin when the registry is first loaded, which the CLI does before parsing its
    arguments (so plugin commands appear in `refiners --help`).

    :param cli: call `cli.add_command(name, run, help=..., configure=...)` once per command.
        `configure(parser)` receives the command's own `argparse.ArgumentParser` and only adds arguments
        to it; it is called only when that command is invoked. `run(args)` receives the parsed
        `argparse.Namespace` and returns the exit code (None means 0).

    How a command reports errors: `run` (or `configure`) raises an exception whose message names the thing
    at fault, e.g. `ValueError("--steps must be at least 1, got 0")` or `FileNotFoundError` naming the path;
    it does not print the error or exit itself. The CLI prints it as one line on stderr,
    `refiners NAME: error: MESSAGE` (whitespace collapsed), and exits with code 2; `refiners --verbose NAME`
    (or `REFINERS_VERBOSE=1`) shows the traceback instead. A command with subcommands names the one that ran
    in that line by setting the parsed default `command_prog` on its subparser
    (`sub.set_defaults(command_prog=sub.prog)`: `refiners train lora: error: ...`). Ctrl-C exits with code
    130. argparse usage errors in the command's own parser keep argparse's format and exit code 2, and a
    `SystemExit` the command raises keeps its code.

    Must not parse `sys.argv`, print, or exit here. A name already taken (by a built-in command such as
    `plugins`, or by another plugin) is reported as a conflict on this plugin.
    """


@hookspec
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    """Add an option to the generation commands (`refiners generate`), e.g. `--lora FILE[:SCALE]`.

    Called once per plugin when the registry is first loaded.

    :param register: call it with one `GenerateOptionSpec` per option. A generation command for a model
        named in the spec's `models` (or for any model when `models` is None) adds `flag` to its parser,
        repeatable, one value each time. Right after parsing, before it loads the model or reads anything
        else, it calls the spec's `validate(values)` when the spec has one: `validate` checks everything it can
        without the model (syntax, files that exist, are readable and of the expected format, finite numbers)
        and raises an exception naming the value at fault, reported as `apply`'s are; it must not load models or
        keep state. After the model is loaded, and before anything is generated, it
        calls `apply(model, values)` with the loaded model (e.g. a `StableDiffusion_1` for "sd15") and the
        list of every value given for the flag, in command-line order; `apply` is not called when the flag
        is absent. `apply` modifies the model in place and returns None; it raises an exception whose
        message names the value at fault (e.g. a missing file), which the command reports, prefixed with
        the flag and its values unless the message starts with the flag.

    Must not parse `sys.argv`, read files or touch any model here: only describe the option. A flag another
    plugin already registered is reported as a conflict on this plugin; a flag that clashes with one of the
    command's own options is reported by that command.
    """
