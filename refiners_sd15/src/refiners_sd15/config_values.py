"""Checks of the values of a component config, shared by the config dataclasses and the `config.json` readers.

Each check returns the value in the type the dataclass holds, or raises ValueError naming the field, what it must
be and what it is: `block_out_channels must be a list of positive integers, got 320`. The loaders add the file
(`unet/config.json: ...`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeGuard


def is_list(value: object) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """Whether `value` is a list or a tuple (how a config reads a JSON list), its items not checked."""
    return isinstance(value, list | tuple)


def positive_int(field: str, value: object) -> int:
    """`value` if it is an integer above 0 (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def positive_number(field: str, value: object) -> float:
    """`value` as a float if it is a finite number above 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a positive finite number, got {value!r}")
    return float(value)


def flag(field: str, value: object) -> bool:
    """`value` if it is true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
    return value


def positive_ints(field: str, value: object) -> tuple[int, ...]:
    """`value` as a tuple if it is a non-empty list (or tuple) of positive integers."""
    items = _items(field, value, "positive integers")
    return tuple(positive_int(f"{field}[{index}]", item) for index, item in enumerate(items))


def flags(field: str, value: object) -> tuple[bool, ...]:
    """`value` as a tuple if it is a non-empty list (or tuple) of true or false."""
    items = _items(field, value, "true or false values")
    return tuple(flag(f"{field}[{index}]", item) for index, item in enumerate(items))


def _items(field: str, value: object, what: str) -> list[Any]:
    if not is_list(value) or not value:
        raise ValueError(f"{field} must be a list of {what}, got {value!r}")
    return list(value)


_CHECKS: dict[object, Callable[[str, object], object]] = {
    int: positive_int,
    float: positive_number,
    bool: flag,
    tuple[int, ...]: positive_ints,
    tuple[bool, ...]: flags,
}


def check_fields(config: object) -> None:
    """Check every field of a frozen config dataclass by its annotation (int, float, bool, tuple[int, ...],
    tuple[bool, ...]), storing it in that type (a list becomes a tuple, an integer a float where a float is
    expected). Called by each config's `__post_init__`; raises ValueError naming the first bad field."""
    hints = typing.get_type_hints(type(config))
    for field in fields(config):  # pyright: ignore[reportArgumentType]
        check = _CHECKS.get(hints.get(field.name))
        if check is not None:
            object.__setattr__(config, field.name, check(field.name, getattr(config, field.name)))
