"""Fixtures of `refiners_core.testing`, registered with pytest through the `pytest11` entry point of refiners-core:
every project that installs refiners-core (and its plugins' test suites) can request them by name.

- `plugin_site`: `plugin_site(distribution, source, *, version="1.0", entry_point=None, requires=(), group="refiners")
  -> "name = module"` makes a plugin distribution appear installed (see `FakeDistributions`); the plugin registry is
  reset before and after, and `REFINERS_DISABLE_PLUGINS` / `REFINERS_STRICT_PLUGINS` are cleared.
- `fresh_dynamo`: torch.compile's caches reset before and after the test.

Importing this module imports neither torch nor any plugin: pytest loads it in every session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from refiners_core.testing.distributions import FakeDistributions


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Make plugin distributions appear installed for this test (see the module docstring)."""
    from refiners_core.plugins import reset_registry
    from refiners_core.plugins.loader import DISABLE_ENV, STRICT_ENV

    fake = FakeDistributions(tmp_path / "site")
    monkeypatch.syspath_prepend(str(fake.site))  # pyright: ignore[reportUnknownMemberType]
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(STRICT_ENV, raising=False)
    reset_registry()
    yield fake.add
    fake.forget_modules()
    reset_registry()


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Reset torch.compile's caches before and after the test."""
    from refiners_core.testing.dynamo import fresh_dynamo as fresh

    with fresh():
        yield
