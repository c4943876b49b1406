"""docs/migration.md: every name of this project that the page gives a Refiners 0.4 user exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).parent.parent / "docs" / "migration.md"
README = PAGE.parent.parent / "README.md"
NAME = re.compile(r"`(refiners_[a-z0-9_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def resolve(dotted: str) -> object:
    """The object at `dotted`: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def names() -> list[str]:
    return sorted(set(NAME.findall(PAGE.read_text(encoding="utf-8"))))


def test_the_page_names_this_projects_api_and_is_linked_from_the_readme() -> None:
    assert len(names()) > 80
    assert "docs/migration.md" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("dotted", names())
def test_every_name_on_the_page_exists(dotted: str) -> None:
    resolve(dotted)


def test_resolve_fails_for_a_name_that_does_not_exist() -> None:
    with pytest.raises(AttributeError):
        resolve("refiners_core.fluxion.Chain.no_such_method")
    with pytest.raises(ModuleNotFoundError):
        resolve("refiners_no_such_package.Thing")
