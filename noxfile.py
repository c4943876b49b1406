"""Test, lint, type-check, build, bench and lock sessions for every package of the monorepo.

Each package is tested alone, in its own virtualenv holding only that package, refiners-core, their
declared dependencies and their test extras, exactly as a user who pip-installs it would have them.
`nox` with no arguments runs every test session and the static checks.

Every environment installs from `constraints.txt`, the lock: exact versions of every runtime, test and tool
dependency, transitive ones included. pip reads it through `PIP_CONSTRAINT`, so the isolated environments
in which pip builds our packages get it too, and a session fails if anything it installed is not pinned
there. `nox -s lock` regenerates it (see the README's "Dependencies and the lock").
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
LOCK = ROOT / "constraints.txt"
LOCK_HOLDS = ROOT / "lock-holds.txt"
WORKSPACE = nox.project.load_toml(ROOT / "pyproject.toml")
PACKAGES = ["refiners_core", "refiners_lora", "refiners_sd15", "refiners_sam"]
PLUGINS = sorted(path.parent.name for path in ROOT.glob("plugins/*/pyproject.toml"))
DISTRIBUTIONS = [ROOT / package for package in PACKAGES] + [ROOT / "plugins" / plugin for plugin in PLUGINS]

nox.options.sessions = ["tests", "tests_plugins", "tests_all", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True


def _local(package: str, extras: str = "") -> str:
    return f"{ROOT / package}{extras}"


def _group(name: str) -> list[str]:
    """The requirements of one dependency group of the root pyproject.toml."""
    return list(nox.project.dependency_groups(WORKSPACE, name))


def _install(session: nox.Session, *requirements: str) -> None:
    """Install `requirements` at the lock's versions, pip first, then check that nothing unpinned came along."""
    session.env["PIP_CONSTRAINT"] = str(LOCK)
    session.install(f"pip=={_pins()['pip']}")
    session.install(*requirements)
    _check_everything_installed_is_locked(session)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """`{normalized name: version}` for every `name==version` line of the lock."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, version = requirement.split("==")
            pins[_normalized(name)] = version
    return pins


def _our_distributions() -> set[str]:
    return {
        _normalized(tomllib.loads((path / "pyproject.toml").read_text())["project"]["name"]) for path in DISTRIBUTIONS
    }


def _installed(session: nox.Session, *, all_: bool = False) -> dict[str, str]:
    """`{name: version}` of what the session's virtualenv holds, our own distributions left out."""
    freeze = str(session.run("python", "-m", "pip", "freeze", *(["--all"] if all_ else []), silent=True, stderr=None))
    installed: dict[str, str] = {}
    for line in freeze.splitlines():
        if "==" in line:
            name, version = line.split("==")
            installed[name.strip()] = version.strip()
    ours = _our_distributions()
    return {name: version for name, version in installed.items() if _normalized(name) not in ours}


def _check_everything_installed_is_locked(session: nox.Session) -> None:
    pins = _pins()
    unpinned = [
        f"{name}=={version}"
        for name, version in _installed(session, all_=True).items()
        if pins.get(_normalized(name)) != version.split("+")[0]
    ]
    if unpinned:
        session.error(f"installed but not pinned in {LOCK.name}: {', '.join(unpinned)}; run `nox -s lock`")


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
    """The packages of this repository that the plugin at `path` depends on (at run time or in its `test` extra, and
    what those depend on in turn), installed from their folders.

    They are not released: pip must never look them up on PyPI (where another project may hold the name).
    """
    folders = {
        _normalized(tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"]): folder
        for folder in DISTRIBUTIONS
    }
    found: list[Path] = []
    pending = [path]
    while pending:
        project = tomllib.loads((pending.pop() / "pyproject.toml").read_text())["project"]
        dependencies = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
        for dependency in dependencies:
            folder = folders.get(_normalized(re.split(r"[\s\[<>=!~;]", dependency, maxsplit=1)[0]))
            if folder is not None and folder != path and folder not in found:
                found.append(folder)
                pending.append(folder)
    return [str(folder) for folder in found if folder.name != "refiners_core"]


@nox.session
def tests_all(session: nox.Session) -> None:
    """Run the cross-package tests of tests/ with every package installed together."""
    packages = [_local(package, "[test]") for package in PACKAGES]
    plugins = [str(ROOT / "plugins" / plugin) for plugin in PLUGINS]
    _install(session, *packages, *plugins, *_group("tests"))
    session.run("pytest", str(ROOT / "tests"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    _install(session, *_group("lint"))
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright over every package (strict on every package's src, see pyproject.toml)."""
    packages = [_local(package, "[test]") for package in PACKAGES]
    _install(session, *packages, *_group("typecheck"))
    session.run("pyright", "--pythonpath", str(Path(session.bin) / "python"), str(ROOT))


@nox.session
def demo(session: nox.Session) -> None:
    """Install our packages and run `refiners demo`: no download, no weights needed; its image goes to .nox/demo/tmp."""
    _install(session, _local("refiners_core"), _local("refiners_lora"), _local("refiners_sd15"), _local("refiners_sam"))
    session.run("refiners", "plugins")
    session.run("refiners", "demo", "--output-dir", session.create_tmp(), *session.posargs)


@nox.session
def build(session: nox.Session) -> None:
    """A wheel and an sdist of every distribution in dist/, checked by `twine check --strict`."""
    _install(session, *_group("release"))
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    ours = _our_distributions()
    for artifact in dist.iterdir():  # earlier builds of our distributions (`refiners_core-0.1.0.tar.gz`); others stay
        if _normalized(artifact.name.split("-")[0]) in ours:
            artifact.unlink()
    for path in DISTRIBUTIONS:
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(dist), str(path))
    session.run("twine", "check", "--strict", *sorted(str(artifact) for artifact in dist.iterdir()))


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite (`bench/run_all.py`, arguments after `--`), with the reference libraries from the lock."""
    packages = [_local(package, "[test]") for package in PACKAGES]
    plugins = [str(ROOT / "plugins" / plugin) for plugin in PLUGINS]
    _install(session, *packages, *plugins)
    session.run("python", str(ROOT / "bench" / "run_all.py"), *session.posargs)


@nox.session
def lock(session: nox.Session) -> None:
    """Regenerate constraints.txt: the newest versions that every declared range and lock-holds.txt allow."""
    session.env["PIP_CONSTRAINT"] = str(LOCK_HOLDS)
    session.install("--upgrade", "pip")
    groups = dict.fromkeys(requirement for name in WORKSPACE["dependency-groups"] for requirement in _group(name))
    session.install(*(f"{path}[test]" for path in DISTRIBUTIONS), *groups)
    pins = sorted(
        (
            f"{name}=={version.split('+')[0]}"  # no local label: `torch==2.13.0` matches the CPU and the CUDA builds
            for name, version in _installed(session, all_=True).items()
        ),
        key=str.lower,
    )
    LOCK.write_text(LOCK_HEADER + "\n".join(pins) + "\n", encoding="utf-8")
    session.log(f"wrote {len(pins)} pins to {LOCK}: run `nox` to check them, then commit it")


LOCK_HEADER = """\
# The lock: exact versions of every runtime, test and tool dependency of this repository, transitive ones included,
# for CPython 3.11 on Linux x86-64 (CI's machine). Every nox session installs from it (PIP_CONSTRAINT), so a commit
# tests the same way next month. The packages themselves declare plain lower bounds: a library must not pin its users.
# Generated by `nox -s lock` from the declared ranges and lock-holds.txt: do not edit by hand.
"""
