"""`refiners plugin new` writes packages that install into a fresh virtualenv, pass their own tests as written, and
appear in `refiners plugins`, for every kind; bad names and folders are refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from refiners_core.cli import main
from refiners_core.scaffold import KINDS, PluginNames, new_plugin


def _run(
    command: list[str | Path], *, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _fresh_virtualenv(folder: Path) -> Path:
    """A new virtualenv that sees this environment's packages (the lock's torch, refiners-core and its plugins,
    pytest) through a `.pth` file, the way a user's environment holds refiners; returns its python."""
    venv.create(folder, with_pip=False)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parent = sysconfig.get_paths()["purelib"]
    (purelib / "zz_refiners_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    return python


def test_every_kind_installs_passes_its_own_tests_and_is_listed(tmp_path: Path) -> None:
    packages = {kind: new_plugin(f"acme-{kind}", kind=kind, into=tmp_path / f"acme-{kind}") for kind in KINDS}
    python = _fresh_virtualenv(tmp_path / "venv")

    installed = _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", *packages.values()])
    assert installed.returncode == 0, installed.stderr

    # Each package's tests, from its own folder, as its author runs them (one process for all five: one torch import).
    tested = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(p / "tests" for p in packages.values())])
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-2000:]
    assert "passed" in tested.stdout and "failed" not in tested.stdout and "skipped" not in tested.stdout

    listed = _run(
        [python, "-c", "import sys; from refiners_core.cli import main; sys.exit(main(['plugins', '--json']))"]
    )
    assert listed.returncode == 0, listed.stderr
    records = {record["distribution"]: record for record in json.loads(listed.stdout)}
    registered = {"adapter": "adapters", "model": "models", "solver": "solvers", "command": "commands"}
    for kind in KINDS:
        record = records[f"acme-{kind}"]
        assert record["status"] == "ok", record
        if kind == "generate-option":
            assert record["generate_options"] == [f"--acme-{kind}"]
        else:
            assert record[registered[kind]] == [f"acme-{kind}"]


def test_the_package_declares_its_entry_point_and_a_core_range_holding_this_core(tmp_path: Path) -> None:
    import tomllib

    import importlib_metadata

    from refiners_core.plugins.compatibility import incompatibility

    folder = new_plugin("Acme_Glow", kind="adapter", into=tmp_path / "glow")
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]

    assert project["name"] == "acme-glow"
    assert project["entry-points"]["refiners"] == {"acme_glow": "acme_glow.plugin"}
    assert incompatibility(project["dependencies"], importlib_metadata.version("refiners-core")) is None
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()) == [
        "README.md",
        "noxfile.py",
        "pyproject.toml",
        "src/acme_glow/__init__.py",
        "src/acme_glow/adapter.py",
        "src/acme_glow/plugin.py",
        "src/acme_glow/py.typed",
        "tests/test_acme_glow.py",
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["plugin", "new", "2fast"], "plugin name '2fast' is not valid"),
        (["plugin", "new", "acme--glow"], "plugin name 'acme--glow' is not valid"),
        (["plugin", "new", "class"], "gives the import name 'class', a Python keyword"),
        (["plugin", "new", "torch"], "a module named 'torch' is already installed"),
    ],
)
def test_bad_names_are_one_line_errors_and_write_nothing(
    arguments: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)

    assert main(arguments) == 2

    error = capsys.readouterr().err
    assert error.startswith("refiners plugin new: error: ") and message in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_empty_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "glow").mkdir()
    (tmp_path / "glow" / "mine.txt").write_text("keep me")

    assert main(["plugin", "new", "acme-glow", "--dir", str(tmp_path / "glow")]) == 2

    assert "exists and is not an empty folder: nothing was written" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "glow").iterdir()] == ["mine.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["glow"]  # no staging folder left behind


def test_names_give_the_distribution_import_and_class_names() -> None:
    assert PluginNames.of("Acme.Glow_v2") == PluginNames("acme-glow-v2", "acme_glow_v2", "AcmeGlowV2")
