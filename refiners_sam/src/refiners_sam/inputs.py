"""Checks of what `SegmentAnything` receives, made before any work: images, points, boxes and mask prompts.

Every refusal is a TypeError (the wrong kind of value) or a ValueError (the right kind, a wrong value) whose message
starts with the argument at fault, down to the item: `foreground_points[2]`, `box_points[0][1]`, `image`.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from typing import Any, TypeGuard, cast

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

Point = tuple[float, float]
Box = tuple[Point, Point]
Points = Sequence[Point] | np.ndarray | torch.Tensor
"""What `predict` takes as points: `(x, y)` pairs, or an `(N, 2)` array or tensor."""
Boxes = Sequence[Sequence[Point]] | np.ndarray | torch.Tensor
"""What `predict` takes as boxes: `[(x1, y1), (x2, y2)]` pairs of corners, or a `(B, 2, 2)` array or tensor."""

MAX_IMAGE_PIXELS = 100_000_000
"""The largest image `SegmentAnything` takes, in pixels (100 megapixels): checked before the image is decoded."""

MAX_PROMPT_POINTS = 1024
"""The most prompt points one `predict` call takes, a box counting as two."""

_repr = reprlib.Repr()  # Python 3.11's Repr takes no arguments
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxtuple = 40, 40, 4, 4


def _short_repr(value: object) -> str:
    """`repr(value)` cut short and on one line (arrays print over several)."""
    return " ".join(_repr.repr(value).split())


def check_image(image: object, long_side: int) -> Image.Image:
    """`image` if it is a PIL image that SAM can encode once its longest side is resized to `long_side`.

    Raises TypeError for anything but a PIL image, ValueError for an image with no pixels, more than
    `MAX_IMAGE_PIXELS`, or so elongated that its short side would be resized to nothing.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    size = f"{width}x{height} (width x height)"
    if width < 1 or height < 1:
        raise ValueError(f"image: {size} has no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image: {size} has {width * height / 1e6:.1f} megapixels, SAM takes at most {MAX_IMAGE_PIXELS / 1e6:g}; "
            "it resizes every image to 1024 pixels on its longest side, so downscale it first"
        )
    if min(width, height) * long_side * 2 < max(width, height):
        raise ValueError(
            f"image: {size} is too elongated: resized to {long_side} pixels on its long side, its short side would "
            f"be 0 pixels; the long side may be at most {2 * long_side} times the short one"
        )
    return image


def check_points(value: object, name: str, image_size: tuple[int, int]) -> list[Point]:
    """The `(x, y)` points of `value` (None, a sequence of pairs, or an `(N, 2)` array or tensor), each inside the
    image of `image_size` `(height, width)`, edges included. Raises TypeError or ValueError naming `name[i]`."""
    if value is None:
        return []
    items = _sequence(value, name, "a list of (x, y) points", (None, 2))
    points: list[Point] = []
    for index, item in enumerate(items):
        if _is_number(item) and len(items) == 2:
            raise TypeError(
                f"{name}[{index}] must be an (x, y) point, got {_short_repr(item)}: {name} is a list of points, "
                f"write {name}=[(x, y)] for one"
            )
        points.append(_point(item, f"{name}[{index}]", image_size))
    return points


def check_boxes(value: object, name: str, image_size: tuple[int, int]) -> list[Box]:
    """The boxes of `value` (None, a sequence of `[(x1, y1), (x2, y2)]`, or a `(B, 2, 2)` array or tensor), each with
    its top left corner left of and above its bottom right one, inside the image of `image_size` `(height, width)`.
    Raises TypeError or ValueError naming `name[i]`."""
    if value is None:
        return []
    boxes: list[Box] = []
    for index, item in enumerate(_sequence(value, name, "a list of boxes [(x1, y1), (x2, y2)]", (None, 2, 2))):
        where = f"{name}[{index}]"
        corners = _sequence(item, where, "a box [(x1, y1), (x2, y2)]", (2, 2))
        if len(corners) != 2 or any(_is_number(corner) for corner in corners):
            numbers_only = len(corners) <= 4 and all(_is_number(corner) for corner in corners)
            got = f"{len(corners)} numbers" if numbers_only and len(corners) != 2 else _short_repr(item)
            raise ValueError(
                f"{where}: a box is two points [(x1, y1), (x2, y2)], got {got}; {name} is a list of boxes, "
                f"{name}=[[(x1, y1), (x2, y2)]] for one"
            )
        (x1, y1), (x2, y2) = (
            _point(corners[0], f"{where}[0]", image_size),
            _point(corners[1], f"{where}[1]", image_size),
        )
        if x1 > x2 or y1 > y2:
            raise ValueError(
                f"{where}: the top left corner ({x1:g}, {y1:g}) must not be right of or below the bottom right one "
                f"({x2:g}, {y2:g})"
            )
        boxes.append(((x1, y1), (x2, y2)))
    return boxes


def check_point_count(count: int) -> None:
    """Raises ValueError when a prompt holds more than `MAX_PROMPT_POINTS` points (a box counts as two)."""
    if count > MAX_PROMPT_POINTS:
        raise ValueError(
            f"foreground_points, background_points and box_points hold {count} points together (a box counts as "
            f"two), at most {MAX_PROMPT_POINTS} are taken"
        )


def check_low_res_mask(value: object, expected_shape: tuple[int, ...]) -> torch.Tensor:
    """`value` if it is a float tensor of logits of `expected_shape` with finite values; TypeError or ValueError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"low_res_mask must be a torch.Tensor of mask logits, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(
            f"low_res_mask must hold float mask logits (such as a previous call's low_res_logits), got {value.dtype}"
        )
    if tuple(value.shape) != expected_shape:
        raise ValueError(f"low_res_mask must have shape {expected_shape}, got {tuple(value.shape)}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        count = int((~torch.isfinite(value)).sum())
        raise ValueError(f"low_res_mask has {count} NaN or infinite values, mask logits must be finite")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_array(value: object) -> TypeGuard[npt.NDArray[Any] | torch.Tensor]:
    return isinstance(value, np.ndarray | torch.Tensor)


def _is_sequence(value: object) -> TypeGuard[Sequence[object]]:
    return isinstance(value, Sequence)


def _sequence(value: object, name: str, what: str, shape: tuple[int | None, ...]) -> Sequence[object]:
    """The items of `value`, a sequence (not a string) or an array or tensor of numbers of `shape` (None: any)."""
    if _is_array(value):
        _check_has_values(value, name)
        array_shape = tuple(value.shape)
        dtype = value.dtype
        numeric = dtype.kind in "iuf" if isinstance(dtype, np.dtype) else not (dtype.is_complex or dtype == torch.bool)
        if not numeric:
            raise TypeError(f"{name} must be {what}, got an array of {dtype}")
        if len(array_shape) != len(shape) or any(e is not None and e != s for e, s in zip(shape, array_shape)):
            expected = "(" + ", ".join("N" if e is None else str(e) for e in shape) + ("," * (len(shape) == 1)) + ")"
            raise ValueError(f"{name} must be {what}, an array of shape {expected}, got shape {array_shape}")
        if shape[0] is None and array_shape[0] > MAX_PROMPT_POINTS:
            raise ValueError(f"{name} holds {array_shape[0]} items, at most {MAX_PROMPT_POINTS} are taken")
        # a list, as the shape has at least one dimension; torch's stub types Tensor.tolist as a bare `list`
        return cast(list[object], value.tolist())  # pyright: ignore[reportUnknownMemberType]
    if isinstance(value, str | bytes | bytearray) or not _is_sequence(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {_short_repr(value)}")
    if shape[0] is None and len(value) > MAX_PROMPT_POINTS:
        raise ValueError(f"{name} holds {len(value)} items, at most {MAX_PROMPT_POINTS} are taken")
    return value


def _point(value: object, where: str, image_size: tuple[int, int]) -> Point:
    items = _sequence(value, where, "an (x, y) point", (2,))
    if len(items) != 2:
        raise ValueError(f"{where} must be an (x, y) point, got {len(items)} values {_short_repr(value)}")
    x, y = (_coordinate(item, f"{where}: {axis}") for item, axis in zip(items, "xy"))
    height, width = image_size
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(
            f"{where}: ({x:g}, {y:g}) is outside the {width}x{height} image: points are (x, y) pixel coordinates "
            f"with 0 <= x <= {width} and 0 <= y <= {height}"
        )
    return x, y


def _coordinate(value: object, where: str) -> float:
    if _is_array(value) and value.ndim == 0:
        _check_has_values(value, where)
        value = value.item()
    if not _is_number(value):
        raise TypeError(f"{where} must be a number, got {type(value).__name__} {_short_repr(value)}")
    try:
        coordinate = float(value)  # type: ignore[arg-type]  # a numbers.Real
    except OverflowError:
        coordinate = math.inf
    if not math.isfinite(coordinate):
        raise ValueError(f"{where} must be a finite number, got {_short_repr(value)}")
    return coordinate


def _check_has_values(value: npt.NDArray[Any] | torch.Tensor, name: str) -> None:
    if isinstance(value, torch.Tensor) and (value.is_meta or value.layout != torch.strided):
        kind = "meta" if value.is_meta else str(value.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense tensor holding values, got a {kind} tensor")
