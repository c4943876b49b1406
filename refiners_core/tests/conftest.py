from __future__ import annotations

import importlib
from collections.abc import Callable

import importlib_metadata
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pip: installs throwaway plugin distributions into the running environment with pip (no network); "
        "deselect with -m 'not pip'",
    )


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
