from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import importlib_metadata
import pytest

from refiners_core.plugins import reset_registry
from refiners_core.plugins.loader import DISABLE_ENV, STRICT_ENV


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pip: installs throwaway plugin distributions into the running environment with pip (no network); "
        "deselect with -m 'not pip'",
    )


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """`plugin_site(distribution, source, *, version="1.0", entry_point=None, requires=()) -> "name = module"`.

    Makes `distribution` appear installed, with one `refiners` entry point whose module has `source` and the
    requirements `requires` (`Requires-Dist` lines, such as "refiners-core<0.1"): real distribution metadata
    (`*.dist-info` with `entry_points.txt`) in a folder put on `sys.path`.

    `importlib_metadata` discovers these exactly like installed distributions, without running pip. The
    registry is reset before and after, and the plugin modules are removed from `sys.modules` afterwards.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # pyright: ignore[reportUnknownMemberType]
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(STRICT_ENV, raising=False)
    modules: list[str] = []

    def add(
        distribution: str,
        source: str,
        *,
        version: str = "1.0",
        entry_point: str | None = None,
        requires: tuple[str, ...] = (),
    ) -> str:
        module = f"refiners_test_{distribution.replace('-', '_')}_plugin"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        requirements = "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n{requirements}"
        )
        (info / "entry_points.txt").write_text(f"[refiners]\n{entry_point or distribution} = {module}\n")
        modules.append(module)
        return f"{entry_point or distribution} = {module}"

    reset_registry()
    yield add
    for module in modules:
        sys.modules.pop(module, None)
    reset_registry()


@pytest.fixture
def installed_plugins() -> Callable[[], str]:
    """`installed_plugins() -> "refiners-lora, t-off"`: the distributions that declare a `refiners` entry point in
    this environment (those `plugin_site` added included), sorted and comma-separated as the registry's warnings list
    them, read from the entry points themselves: the same in nox's one-package sessions and in an all-packages venv."""

    def names() -> str:
        importlib.invalidate_caches()
        entry_points = importlib_metadata.entry_points(group="refiners")  # pyright: ignore[reportUnknownMemberType]
        return ", ".join(sorted({entry_point.dist.name for entry_point in entry_points if entry_point.dist}))

    return names
