"""Write a new plugin package: `new_plugin("acme-glow", kind="adapter", into=Path("acme-glow"))`.

The package is complete and green from the start: `pyproject.toml` with its `refiners` entry point and a
`refiners-core` range that holds the installed core, the `@hookimpl` module, a skeleton implementation of its kind,
tests written with `refiners_core.testing` (`check_adapter` for adapters), a README and a noxfile.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import ModuleType

import importlib_metadata

from refiners_core.scaffold import adapter_kind, command_kind, common, generate_option_kind, model_kind, solver_kind

KINDS: dict[str, ModuleType] = {
    "adapter": adapter_kind,
    "model": model_kind,
    "solver": solver_kind,
    "command": command_kind,
    "generate-option": generate_option_kind,
}
"""Each kind of plugin `refiners plugin new --kind` writes, and the module holding its templates."""

_SUMMARIES = {
    "adapter": "An adapter for refiners models",
    "model": "A model for refiners",
    "solver": "A diffusion solver for refiners",
    "command": "A refiners command",
    "generate-option": "An option of refiners generate",
}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")


@dataclass(frozen=True)
class PluginNames:
    """The names of a plugin derived from the one the user gives (`Acme_Glow` or `acme-glow`)."""

    distribution: str
    """`acme-glow`: the distribution, and the name it registers (the adapter, model, solver or command name, or
    the generate option's flag without `--`)."""
    package: str
    """`acme_glow`: the import name, under `src/`."""
    class_name: str
    """`AcmeGlow`: the prefix of its classes."""

    @staticmethod
    def of(name: str) -> PluginNames:
        """Raise ValueError naming `name` if it is not a valid distribution and import name."""
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"plugin name {name!r} is not valid: use letters, digits and single '-', '_' or '.' between them, "
                "starting with a letter (for example acme-glow)"
            )
        distribution = re.sub(r"[-_.]+", "-", name).lower()
        package = distribution.replace("-", "_")
        if keyword.iskeyword(package):
            raise ValueError(f"plugin name {name!r} gives the import name {package!r}, a Python keyword")
        return PluginNames(distribution, package, "".join(part.capitalize() for part in distribution.split("-")))


def new_plugin(name: str, *, kind: str = "adapter", into: Path | None = None) -> Path:
    """Write the plugin package `name` of `kind` into the folder `into` (default `./<name>`) and return it.

    Raises ValueError naming what is at fault, before writing anything: an invalid name or kind, an import name
    that an installed module already has (`torch`, `refiners_core`...), a folder that exists and is not empty. The
    files are written to a temporary folder first, so a failure leaves no half-written package.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r} (kinds: {', '.join(KINDS)})")
    names = PluginNames.of(name)
    if importlib.util.find_spec(names.package) is not None:
        raise ValueError(f"plugin name {name!r}: a module named {names.package!r} is already installed; choose another")
    destination = Path(into) if into is not None else Path(names.distribution)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ValueError(f"{destination} exists and is not an empty folder: nothing was written")
    files = _render(names, kind)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def _render(names: PluginNames, kind: str) -> dict[str, str]:
    templates = KINDS[kind]
    summary = _SUMMARIES[kind]
    requirements = [_requirement("refiners-core"), *(_requirement(name) for name in templates.DEPENDENCIES)]
    values = {
        "distribution": names.distribution,
        "package": names.package,
        "Class": names.class_name,
        "name": names.distribution,
        "entry_point": names.package,
        "kind": kind,
        "module": templates.MODULE,
        "summary": summary,
        "dependencies": ", ".join(f'"{requirement}"' for requirement in [*requirements, "torch>=2.2"]),
        "adapter_note": ", `check_adapter` among them" if kind in ("adapter", "generate-option") else "",
    }
    exports = [Template(export).substitute(values) for export in templates.EXPORTS]
    values["exports"] = ", ".join(exports)
    values["all"] = ", ".join(f'"{export}"' for export in sorted(exports))
    values["lazy"] = "".join(f'        "{export}": "{names.package}.{templates.MODULE}",\n' for export in exports)
    source = f"src/{names.package}"
    files = {
        "pyproject.toml": common.PYPROJECT,
        "README.md": common.README,
        "noxfile.py": common.NOXFILE,
        f"{source}/__init__.py": common.INIT,
        f"{source}/py.typed": "",
        f"{source}/plugin.py": templates.PLUGIN,
        f"{source}/{templates.MODULE}.py": templates.IMPLEMENTATION,
        f"tests/test_{names.package}.py": templates.TESTS,
    }
    return {path: Template(text).substitute(values) for path, text in files.items()}


def _requirement(distribution: str) -> str:
    """`refiners-core>=0.1,<0.2`: the installed version's compatible range (next minor below 1.0, next major
    from 1.0), or the bare name if the distribution is not installed."""
    try:
        version = importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return distribution
    numbers = [int(part) for part in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = numbers[0], numbers[1]
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"{distribution}>={major}.{minor},<{upper}"
