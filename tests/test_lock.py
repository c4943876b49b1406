"""constraints.txt, the lock, pins every dependency that any package or tool of this repository declares."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
LOCK = ROOT / "constraints.txt"
PYPROJECTS = sorted(
    [ROOT / "pyproject.toml", *ROOT.glob("refiners_*/pyproject.toml"), *ROOT.glob("plugins/*/pyproject.toml")]
)


def _lock_pins(text: str) -> dict[str, Version]:
    """`{canonical name: version}` of a lock's lines, each of which must be an exact `name==version` pin."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{LOCK.name}:{number}: {line!r} is no pin"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{LOCK.name}:{number}: {requirement.name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def _declared(pyproject: Path) -> list[tuple[str, Requirement]]:
    """Every requirement `pyproject` declares, with where: runtime, extras, dependency groups, build system."""
    data: dict[str, Any] = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    where = pyproject.relative_to(ROOT)
    project = data.get("project", {})
    sections: list[tuple[str, list[str]]] = [
        (f"{where} [project] dependencies", project.get("dependencies", [])),
        *((f"{where} extra [{name}]", items) for name, items in project.get("optional-dependencies", {}).items()),
        *((f"{where} dependency group {name}", items) for name, items in data.get("dependency-groups", {}).items()),
        (f"{where} [build-system] requires", data.get("build-system", {}).get("requires", [])),
    ]
    return [(section, Requirement(item)) for section, items in sections for item in items]


def _unlocked(declared: list[tuple[str, Requirement]], pins: dict[str, Version], ours: set[str]) -> list[str]:
    """The declared requirements (not on our own distributions) that the lock misses or pins outside their range."""
    problems: list[str] = []
    for section, requirement in declared:
        name = canonicalize_name(requirement.name)
        if name in ours:
            continue
        if name not in pins:
            problems.append(f"{section}: {requirement} is not in {LOCK.name}")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{section}: {requirement} excludes the locked {requirement.name}=={pins[name]}")
    return problems


def _our_distributions() -> set[str]:
    names = {tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("name") for path in PYPROJECTS}
    return {canonicalize_name(name) for name in names if name}


def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range() -> None:
    declared = [entry for pyproject in PYPROJECTS for entry in _declared(pyproject)]
    assert len(declared) > 40, "the declared dependencies were not found: this test would check nothing"
    assert _unlocked(declared, _lock_pins(LOCK.read_text(encoding="utf-8")), _our_distributions()) == []


def test_a_dependency_missing_from_the_lock_or_outside_it_is_reported() -> None:
    declared = [("pkg extra [test]", Requirement("diffusers>=0.30")), ("pkg", Requirement("torch>=2.2"))]
    pins = {"torch": Version("2.1.0")}
    assert _unlocked(declared, pins, set()) == [
        f"pkg extra [test]: diffusers>=0.30 is not in {LOCK.name}",
        "pkg: torch>=2.2 excludes the locked torch==2.1.0",
    ]
    assert _unlocked(declared, {"diffusers": Version("0.30.0"), "torch": Version("2.13.0")}, set()) == []


def test_the_lock_respects_every_hold_of_lock_holds_txt() -> None:
    holds = [
        ("lock-holds.txt", Requirement(line))
        for line in (ROOT / "lock-holds.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [str(requirement) for _, requirement in holds][0] == "torch==2.13.0"  # the CPU wheel on CI's disk
    assert _unlocked(holds, _lock_pins(LOCK.read_text(encoding="utf-8")), set()) == []
