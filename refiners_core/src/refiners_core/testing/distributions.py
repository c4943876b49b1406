"""Distributions that look installed to `importlib.metadata`, without pip: test a plugin's registration in
milliseconds, in the running interpreter."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path


class FakeDistributions:
    """A folder of `*.dist-info` metadata and plugin modules; put it on `sys.path` (the `plugin_site` fixture of
    `refiners_core.testing`'s pytest plugin does, and cleans up) and its distributions are discovered exactly as
    installed ones, entry points included."""

    def __init__(self, site: Path) -> None:
        site.mkdir(parents=True, exist_ok=True)
        self.site = site
        self.modules: list[str] = []
        """The plugin modules written so far, to remove from `sys.modules` when done (`forget_modules`)."""

    def add(
        self,
        distribution: str,
        source: str,
        *,
        version: str = "1.0",
        entry_point: str | None = None,
        requires: Sequence[str] = (),
        group: str = "refiners",
    ) -> str:
        """Make `distribution` appear installed, with one entry point in `group` (named `entry_point`, default the
        distribution's name) whose module has `source` (dedented) and the requirements `requires` (`Requires-Dist`
        lines such as "refiners-core>=0.1,<0.2"). Returns the entry point line, `"name = module"`."""
        module = f"refiners_test_{re.sub(r'[^0-9A-Za-z]+', '_', distribution).lower()}_plugin"
        (self.site / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.site / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        requirements = "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n{requirements}"
        )
        line = f"{entry_point or distribution} = {module}"
        (info / "entry_points.txt").write_text(f"[{group}]\n{line}\n")
        self.modules.append(module)
        return line

    def forget_modules(self) -> None:
        """Remove the plugin modules from `sys.modules`, so a later test imports its own."""
        for module in self.modules:
            sys.modules.pop(module, None)


GREETER_PLUGIN = """
    from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, ModelSpec, hookimpl

    def configure(parser):
        parser.add_argument("--name", default="world")

    def run(args):
        print(f"hello {args.name}")
        return 3

    @hookimpl
    def refiners_register_commands(cli):
        cli.add_command("t-hello", run, help="Greet someone", configure=configure)

    @hookimpl
    def refiners_register_adapters(register):
        register(AdapterSpec("t-scale", lambda target: target))

    @hookimpl
    def refiners_register_models(register):
        register(ModelSpec("t-model", dict))

    @hookimpl
    def refiners_register_generate_options(register):
        register(GenerateOptionSpec("--t-style", lambda model, values: None))
"""
"""The source of a plugin that works, for `FakeDistributions.add` (the `plugin_site` fixture): the command `t-hello
[--name NAME]` (prints "hello NAME", exits 3), the adapter `t-scale`, the model `t-model` and the generate option
`--t-style`, none of which does anything."""
