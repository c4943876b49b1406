"""Test, lint and type-check sessions for every package of the monorepo.

Each package is tested alone, in its own virtualenv holding only that package, refiners-core, their
declared dependencies and their test extras, exactly as a user who pip-installs it would have them.
`nox` with no arguments runs every test session; `nox -s lint typecheck` runs the static checks.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = ["refiners_core", "refiners_lora", "refiners_sd15", "refiners_sam"]
PLUGINS = sorted(path.parent.name for path in ROOT.glob("plugins/*/pyproject.toml"))

nox.options.sessions = ["tests", "tests_plugins", "tests_all"]
nox.options.error_on_missing_interpreters = True


def _local(package: str, extras: str = "") -> str:
    return f"{ROOT / package}{extras}"


def _install(session: nox.Session, *requirements: str) -> None:
    session.install(*CONSTRAINTS, *requirements)


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Run one package's tests with only that package (and refiners-core) installed."""
    requirements = [_local("refiners_core", "[test]")]
    if package != "refiners_core":
        requirements.append(_local(package, "[test]"))
    _install(session, *requirements)
    session.run("pytest", str(ROOT / package / "tests"), *session.posargs)


@nox.session
@nox.parametrize("plugin", PLUGINS or [None])
def tests_plugins(session: nox.Session, plugin: str | None) -> None:
    """Run the tests of one third-party style plugin under plugins/."""
    if plugin is None:
        session.skip("no plugin packages under plugins/ yet")
        return
    path = ROOT / "plugins" / plugin
    _install(session, _local("refiners_core", "[test]"), *_monorepo_dependencies(path), f"{path}[test]")
    session.run("pytest", str(path / "tests"), *session.posargs)


def _monorepo_dependencies(path: Path) -> list[str]:
    """The packages of this repository that the plugin at `path` depends on, installed from their folders.

    They are not released: pip must never look them up on PyPI (where another project may hold the name).
    """
    dependencies = tomllib.loads((path / "pyproject.toml").read_text())["project"].get("dependencies", [])
    names = {
        re.split(r"[\s\[<>=!~;]", dependency, maxsplit=1)[0].lower().replace("-", "_") for dependency in dependencies
    }
    return [_local(package) for package in PACKAGES if package in names and package != "refiners_core"]


@nox.session
def tests_all(session: nox.Session) -> None:
    """Run the cross-package tests of tests/ with every package installed together."""
    packages = [_local(package, "[test]") for package in PACKAGES]
    plugins = [str(ROOT / "plugins" / plugin) for plugin in PLUGINS]
    _install(session, *packages, *plugins)
    session.run("pytest", str(ROOT / "tests"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright over every package (strict on refiners_core, see pyproject.toml)."""
    packages = [_local(package, "[test]") for package in PACKAGES]
    _install(session, *packages, "pyright[nodejs]", "nox")
    session.run("pyright", "--pythonpath", str(Path(session.bin) / "python"), str(ROOT))


@nox.session
def demo(session: nox.Session) -> None:
    """Install our packages and run `refiners demo`: no download, no weights needed; its image goes to .nox/demo/tmp."""
    _install(session, _local("refiners_core"), _local("refiners_lora"), _local("refiners_sd15"), _local("refiners_sam"))
    session.run("refiners", "plugins")
    session.run("refiners", "demo", "--output-dir", session.create_tmp(), *session.posargs)
