"""`Reference`: a `"module:attribute"` string standing for an object imported on first use.

Specs take references where they take factories, loaders, classes and callbacks, as entry points name objects, so
that a plugin registers without importing its implementation (and torch): `refiners --help` and `refiners plugins`
then load every plugin in a fraction of a second.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Reference:
    """`Reference("refiners_lora.adapter:LoraAdapter")`: the object is imported by `resolve()`, or by calling the
    reference, which calls the object. Two references are equal when their strings are."""

    __slots__ = ("_value", "text")

    def __init__(self, text: str) -> None:
        """Raise ValueError naming `text` unless it reads `package.module:attribute` (the attribute may be
        dotted: `module:Class.method`)."""
        if not isinstance(text, str) or not _REFERENCE.fullmatch(text):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"{text!r} is not a reference: write 'package.module:attribute'")
        self.text = text
        self._value: Any = None

    def resolve(self) -> Any:
        """The object, imported once. Raises ImportError naming the reference if its module or attribute is missing."""
        if self._value is None:
            module_name, _, attribute = self.text.partition(":")
            try:
                value: Any = importlib.import_module(module_name)
            except ImportError as error:
                raise ImportError(f"cannot resolve {self.text!r}: {error}") from error
            for part in attribute.split("."):
                try:
                    value = getattr(value, part)
                except AttributeError:
                    raise ImportError(
                        f"cannot resolve {self.text!r}: {module_name} has no attribute {attribute!r}"
                    ) from None
            self._value = value
        return self._value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Reference({self.text!r})"


def resolve(value: Any) -> Any:
    """`value` itself, or the object a `Reference` (or a `"module:attribute"` string) names."""
    if isinstance(value, str):
        value = Reference(value)
    return value.resolve() if isinstance(value, Reference) else value
