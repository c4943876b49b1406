"""Package exports imported on first use (PEP 562), so that importing a package, and a plugin module inside it,
does not import torch: `refiners --help` and `refiners plugins` load every plugin without it.

In a package's `__init__.py`::

    from typing import TYPE_CHECKING
    from refiners_core.lazy import lazy_exports

    if TYPE_CHECKING:  # what type checkers and IDEs see
        from acme.model import AcmeModel

    __getattr__, __dir__ = lazy_exports(__name__, {"AcmeModel": "acme.model"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of the package `package` whose public names `exports` maps to the modules
    defining them (each imported on first access), or to `"module:attribute"` for a name exported under another
    name. An unknown name raises AttributeError as a missing attribute does."""
    names = dict(exports)

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        return getattr(importlib.import_module(module), attribute or name)

    def __dir__() -> list[str]:
        return sorted({*names, *vars(importlib.import_module(package))})

    return __getattr__, __dir__
