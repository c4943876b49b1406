"""Load weights written by another library into a Fluxion model, all or nothing.

A model package describes how the keys of a file map to its layers with an explicit `KeyMapping` (file key
-> our `state_dict` key); `load_state_dict_checked` checks every key and shape first and only then copies the
tensors in, so a bad file never leaves a model half-loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from refiners_core.weights import WeightsError, check_weights

KeyMapping = Mapping[str, str]
"""File key (as written in the file) -> our `state_dict` key."""


def shape_of(tensors: Mapping[str, torch.Tensor], key: str, ndim: int, gives: str) -> tuple[int, ...]:
    """The shape of `tensors[key]`, from which a config reads `gives` (e.g. "in_channels"), checked: the key is
    there, holds a tensor of `ndim` dimensions, none of them empty. Raises ValueError naming the key otherwise."""
    tensor = tensors.get(key)
    if tensor is None:
        raise ValueError(f"no '{key}', from which {gives} is read")
    if not isinstance(tensor, torch.Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"'{key}' is a {type(tensor).__name__}, not a tensor ({gives} is read from its shape)")
    shape = tuple(tensor.shape)
    if len(shape) != ndim or not all(shape):
        raise ValueError(
            f"'{key}' has shape {shape}, expected {ndim} non-empty dimensions ({gives} is read from its shape)"
        )
    return shape


def compose(first: KeyMapping, second: KeyMapping) -> dict[str, str]:
    """Chain two mappings: `first` takes keys of format A to format B, `second` takes B to ours.

    Raises KeyError naming the intermediate key when `second` does not know a key `first` produces.
    """
    composed: dict[str, str] = {}
    for source, intermediate in first.items():
        if intermediate not in second:
            raise KeyError(f"mapping has no entry for '{intermediate}' (from '{source}')")
        composed[source] = second[intermediate]
    return composed


def invert(mapping: KeyMapping) -> dict[str, str]:
    """Our key -> file key. Raises ValueError if two file keys map to the same key of ours."""
    inverted: dict[str, str] = {}
    for source, target in mapping.items():
        if target in inverted:
            raise ValueError(f"'{inverted[target]}' and '{source}' both map to '{target}'")
        inverted[target] = source
    return inverted


def load_state_dict_checked(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    mapping: KeyMapping | None = None,
    ignore: Iterable[str] = (),
    assign_to_device: torch.device | str | None = None,
) -> None:
    """Copy `tensors` into `model`, translating keys with `mapping` (identity if None).

    Every key of the file must map to a key of the model and every key of the model must be provided; shapes
    must match (a 1x1 convolution kernel loads into a linear weight of the same size, the only leniency).
    Tensors are converted to the dtype and device of the parameter they load into, but an integer, bool or complex
    tensor is never converted to a floating-point parameter or buffer, and a parameter's tensor must hold finite
    values only (`check_weights`; buffers may hold infinities, as attention masks do). `ignore` lists file keys
    known to carry nothing the model needs (e.g. position ids buffers).

    With `assign_to_device`, the model (typically built on the meta device) takes the file's tensors as its
    own, moved to that device and converted to its dtype where needed, instead of copying them into storage
    it already has: loading then holds the weights in memory once, not twice. Its parameters are then normal
    tensors even under `torch.inference_mode()` (with version counters, trainable), as `load_tensors` gives, unless
    `tensors` holds inference tensors.

    Raises WeightsError naming `source` (the file), the key as written in the file, our layer path and the
    expected and found shapes, or the dtype or non-finite value found; in that case the model is left untouched.
    """
    ignored = set(ignore)
    own = model.state_dict(keep_vars=True)
    reverse = invert(mapping) if mapping is not None else None
    prepared: dict[str, torch.Tensor] = {}
    file_keys: dict[str, str] = {}
    unexpected: list[str] = []
    for file_key, tensor in tensors.items():
        if file_key in ignored:
            continue
        key = file_key if mapping is None else mapping.get(file_key)
        if key is None or key not in own:
            unexpected.append(file_key)
            continue
        target = own[key]
        if tensor.shape != target.shape:
            if tensor.numel() != target.numel() or _strip_trailing_ones(tensor.shape) != tuple(target.shape):
                raise WeightsError(
                    f"{source}: '{file_key}' has shape {tuple(tensor.shape)} but our layer "
                    f"`{_layer_path(model, key)}` ({key}) expects {tuple(target.shape)}: "
                    "these weights are for another architecture or configuration"
                )
            tensor = tensor.reshape(target.shape)
        prepared[key] = tensor
        file_keys[key] = file_key
    if unexpected:
        shown = ", ".join(f"'{key}'" for key in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise WeightsError(f"{source}: {len(unexpected)} key(s) match no layer of {type(model).__name__}: {shown}")
    missing = [key for key in own if key not in prepared]
    if missing:
        shown = ", ".join(
            f"`{_layer_path(model, key)}` ({key}"
            + (f", file key '{reverse[key]}')" if reverse and key in reverse else ")")
            for key in missing[:5]
        )
        more = " ..." if len(missing) > 5 else ""
        raise WeightsError(f"{source}: no weights for {len(missing)} key(s) of {type(model).__name__}: {shown}{more}")
    floating = [key for key in prepared if own[key].is_floating_point()]
    parameters = [file_keys[key] for key in floating if isinstance(own[key], nn.Parameter)]
    check_weights(tensors, source=source, keys=parameters)
    buffers = {file_keys[key]: prepared[key] for key in floating if not isinstance(own[key], nn.Parameter)}
    for file_key, tensor in buffers.items():
        if not tensor.is_floating_point():
            check_weights({file_key: tensor}, source=source)  # raises, naming the dtype
    if assign_to_device is not None:
        # normal parameters even under inference mode (they have version counters), unless given inference tensors
        with torch.inference_mode(any(tensor.is_inference() for tensor in prepared.values())):
            converted = {
                key: tensor.to(device=assign_to_device, dtype=own[key].dtype) for key, tensor in prepared.items()
            }
            model.load_state_dict(converted, strict=True, assign=True)
        return
    with torch.no_grad():
        for key, tensor in prepared.items():
            own[key].copy_(tensor)


def _strip_trailing_ones(shape: torch.Size) -> tuple[int, ...]:
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _layer_path(model: nn.Module, key: str) -> str:
    layer_key = key.rsplit(".", 1)[0]
    return f"{type(model).__name__}.{layer_key}" if layer_key != key else type(model).__name__
