"""The release: every distribution builds a wheel and an sdist with complete metadata, and the wheels of dist/ alone
install into a fresh virtualenv where the `refiners` CLI lists the plugins and generates, writing nothing to stderr.

The build runs once per session (`python -m build --no-isolation`, so no network); installing the third-party
requirements into the virtualenv goes through the lock (constraints.txt), never an unpinned torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
LICENSE = ROOT / "LICENSE"
PROJECTS = sorted([*ROOT.glob("refiners_*/pyproject.toml"), *ROOT.glob("plugins/*/pyproject.toml")])
PROJECT_URLS = {"Homepage", "Documentation", "Repository", "Issues"}
INSTALLED = ("refiners-sd15", "refiners-lora")  # what a user asks for; refiners-core comes as their dependency
WITH_CORE = ("refiners-core", *INSTALLED)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Wheels = dict[str, tuple[Path, Message]]  # each wheel and its METADATA, by canonical distribution name


def _run(
    command: list[str | Path], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    arguments = [str(part) for part in command]
    return subprocess.run(arguments, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _user_env(**extra: str) -> dict[str, str]:
    """The test's environment without what would make the venv see the repository or another environment."""
    hidden = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_CONSTRAINT"}
    return {**{key: value for key, value in os.environ.items() if key not in hidden}, **extra}


def _read_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(archive.read(name).decode())


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel and an sdist (the wheel built from the sdist) of every distribution of the repository."""
    out = tmp_path_factory.mktemp("dist")
    for project in PROJECTS:
        result = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, project.parent], timeout=300)
        assert result.returncode == 0, f"building {project.parent}:\n{result.stdout}\n{result.stderr}"
    assert len(list(out.glob("*.whl"))) == len(list(out.glob("*.tar.gz"))) == len(PROJECTS)
    return out


@pytest.fixture(scope="session")
def wheels(dist: Path) -> Wheels:
    """Each wheel and its METADATA, by distribution name."""
    read = {path: _read_metadata(path) for path in dist.glob("*.whl")}
    return {canonicalize_name(message["Name"]): (path, message) for path, message in read.items()}


def test_every_package_ships_the_root_license() -> None:
    assert LICENSE.read_text().startswith("MIT License\n")
    folders = {project.parent.name for project in PROJECTS}
    assert {"refiners_core", "refiners_lora", "refiners_sd15", "refiners-training"} <= folders
    differing = [str(p.parent) for p in PROJECTS if (p.parent / "LICENSE").read_bytes() != LICENSE.read_bytes()]
    assert not differing, f"LICENSE differs from the root LICENSE in {differing}"


def test_artifacts_pass_twine_check_strict(dist: Path) -> None:
    result = _run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2 * len(PROJECTS)


@pytest.mark.parametrize("project", PROJECTS, ids=lambda project: project.parent.name)
def test_wheel_declares_license_python_urls_and_markdown_readme(project: Path, wheels: Wheels) -> None:
    wheel, message = wheels[canonicalize_name(tomllib.loads(project.read_text())["project"]["name"])]
    assert message["License-Expression"] == "MIT"
    assert message.get_all("License-File") == ["LICENSE"]
    assert not [value for value in message.get_all("Classifier", []) if value.startswith("License ::")]
    with zipfile.ZipFile(wheel) as archive:
        licenses = [member for member in archive.namelist() if member.endswith(".dist-info/licenses/LICENSE")]
        assert len(licenses) == 1, f"{wheel.name} has no .dist-info/licenses/LICENSE"
        assert archive.read(licenses[0]) == LICENSE.read_bytes()
    assert message["Requires-Python"] == ">=3.11"
    urls = dict(value.split(", ", 1) for value in message.get_all("Project-URL", []))
    assert set(urls) == PROJECT_URLS
    folder = project.parent.relative_to(ROOT).as_posix()
    assert urls["Repository"].endswith(f"/tree/main/{folder}")
    assert urls["Documentation"].endswith(f"/blob/main/{folder}/README.md")
    assert message["Description-Content-Type"] == "text/markdown"


def test_requirements_on_refiners_distributions_are_bounded_and_admit_the_built_versions(wheels: Wheels) -> None:
    built = {name: Version(message["Version"]) for name, (_, message) in wheels.items()}
    checked = 0
    for name, (_, message) in wheels.items():
        for requirement in map(Requirement, message.get_all("Requires-Dist", [])):
            required = canonicalize_name(requirement.name)
            if not required.startswith("refiners-"):
                continue
            checked += 1
            assert any(spec.operator == "<" for spec in requirement.specifier), f"{name}: {requirement} has no `<`"
            assert required in built, f"{name} requires {required}, which is not built here"
            assert requirement.specifier.contains(built[required]), f"{name}: {requirement} refuses {built[required]}"
    assert checked > 0


def test_every_sdist_ships_license_readme_and_pkg_info(dist: Path) -> None:
    for sdist in dist.glob("*.tar.gz"):
        base = sdist.name.removesuffix(".tar.gz")
        with tarfile.open(sdist) as archive:
            names = set(archive.getnames())
        assert {f"{base}/LICENSE", f"{base}/README.md", f"{base}/PKG-INFO"} <= names, sdist.name


@dataclass(frozen=True)
class FreshVenv:
    """A virtualenv outside the repository with our wheels installed, and a working directory outside it too."""

    path: Path
    workdir: Path

    @property
    def scripts(self) -> Path:
        return self.path / ("Scripts" if sys.platform == "win32" else "bin")

    def run(self, program: str, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one of the venv's programs as a user would: from `workdir`, with no PYTHONPATH."""
        return _run([self.scripts / program, *args], cwd=self.workdir, env=_user_env(), timeout=timeout)


def _third_party_requirements(wheels: Wheels) -> list[str]:
    """The runtime requirements of the installed distributions that are not ours (extras excluded)."""
    requirements: set[str] = set()
    for name in WITH_CORE:
        for requirement in map(Requirement, wheels[name][1].get_all("Requires-Dist", [])):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if not canonicalize_name(requirement.name).startswith("refiners-"):
                requirements.add(str(requirement))
    return sorted(requirements)


@pytest.fixture(scope="module")
def venv(dist: Path, wheels: Wheels, tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    """refiners-sd15 and refiners-lora installed from dist/ alone (their own dependencies first, from the lock)."""
    created = FreshVenv(tmp_path_factory.mktemp("venv") / "env", tmp_path_factory.mktemp("workdir"))
    assert not created.path.is_relative_to(ROOT) and not created.workdir.is_relative_to(ROOT)
    result = _run([sys.executable, "-m", "venv", created.path], timeout=120)
    assert result.returncode == 0, result.stderr
    env = _user_env(PIP_CONSTRAINT=str(ROOT / "constraints.txt"))
    steps = [
        ["install", "--upgrade", "pip"],
        ["install", *_third_party_requirements(wheels)],
        ["install", "--no-index", "--find-links", str(dist), *INSTALLED],
    ]
    for step in steps:
        result = _run([created.scripts / "python", "-m", "pip", *step], env=env, cwd=created.workdir, timeout=1200)
        assert result.returncode == 0, f"pip {' '.join(step)}:\n{result.stdout}\n{result.stderr}"
    return created


LOCATE = """
import importlib.metadata, importlib.util, json, sys, sysconfig
names = sys.argv[1:]
print(json.dumps({
    "purelib": sysconfig.get_paths()["purelib"],
    "distributions": {
        name: {
            "direct_url": importlib.metadata.distribution(name).read_text("direct_url.json"),
            "module": importlib.util.find_spec(name.replace("-", "_")).origin,
        }
        for name in names
    },
}))
"""


def test_wheels_install_from_dist_alone_not_editable_into_site_packages(venv: FreshVenv) -> None:
    result = venv.run("python", "-c", LOCATE, *WITH_CORE)
    assert result.returncode == 0, result.stderr
    located = json.loads(result.stdout)
    purelib = Path(located["purelib"]).resolve()
    assert purelib.is_relative_to(venv.path.resolve())
    for name, found in located["distributions"].items():
        direct_url = json.loads(found["direct_url"] or "{}")
        assert not direct_url.get("dir_info", {}).get("editable", False), f"{name} is installed editable"
        module = Path(found["module"]).resolve()
        assert module.is_relative_to(purelib), f"{name} is imported from {module}, not from {purelib}"
        assert not module.is_relative_to(ROOT)


def test_refiners_plugins_json_lists_lora_and_sd15_on_stdout_alone(venv: FreshVenv) -> None:
    result = venv.run("refiners", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    entries = {entry["distribution"]: entry for entry in json.loads(result.stdout)}
    assert set(INSTALLED) <= set(entries)
    assert all(entries[name]["error"] is None for name in INSTALLED), entries
    assert "lora" in entries["refiners-lora"]["adapters"]
    assert "sd15" in entries["refiners-sd15"]["models"]


def test_refiners_plugins_table_shows_lora_and_sd15_ok_without_stderr(venv: FreshVenv) -> None:
    result = venv.run("refiners", "plugins")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = {line.split()[0]: line.split()[-1] for line in result.stdout.splitlines()[1:]}
    assert {name: rows.get(name) for name in INSTALLED} == {name: "ok" for name in INSTALLED}


def test_wheels_install_from_dist_alone_and_generate(venv: FreshVenv) -> None:
    output = venv.workdir / "demo"
    result = venv.run("refiners", "demo", "--output-dir", output, timeout=900)  # as `nox -s demo` runs it
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "FAILED" not in result.stdout
    assert "[ok] sd15: " in result.stdout  # refiners-sd15's own demo ran, with its LoRA
    assert (output / "refiners-demo-sd15.png").read_bytes().startswith(PNG_SIGNATURE)
