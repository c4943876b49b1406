"""Plan a LoRA file onto a model without changing it: which layer each of its modules patches, with what family,
rank and alpha, and every key that cannot be applied, with the reason.

`LoraManager.add` loads what `plan_lora` plans (and refuses a file whose plan has any refusal); `refiners lora
inspect` shows the plan of a file read from its header only (tensors on the meta device, scalars read) against a
model built on the meta device. Both run this same code, so what one accepts the other reports as loadable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter
from refiners_core.module_names import ForeignModuleNames
from refiners_core.weights import WeightsError, check_weights
from refiners_lora.adapter import LoraTarget
from refiners_lora.base_models import check_base_model
from refiners_lora.formats import ModuleLora, ParsedLora, Role, parse_lora

UNKNOWN_KEY = "not a weight of a known family (a LoRA's down, up or alpha in the file's format)"
"""The reason given for a key of no recognised form."""


@dataclass(frozen=True)
class PlannedModule:
    """One module of the file and the layer it patches, checked to fit."""

    module: str
    """The module's name in the file (a kohya or diffusers name, or our layer path)."""
    path: str
    """The path of the layer it patches, relative to the model (as `named_modules` gives it)."""
    layer: LoraTarget
    lora: ModuleLora


@dataclass(frozen=True)
class Refusal:
    """Keys of the file that cannot be applied whatever `strict` is, and why, as the error `LoraManager.add` raises.

    `keys` is empty for a refusal of the whole file (a LoRA made for another base model).
    """

    keys: tuple[str, ...]
    message: str
    """The whole error message, which starts with the file's name."""
    reason: str
    """The message without the file's name."""


@dataclass(frozen=True)
class LoraPlan:
    """What loading a LoRA file onto a model would do: `modules` in the file's order, `unmatched` keys (of no
    recognised form, or naming no layer of the model: skipped with `strict=False`), each with the reason, and
    `refused` keys, in order."""

    parsed: ParsedLora
    modules: list[PlannedModule]
    unmatched: dict[str, str]
    refused: list[Refusal]


def plan_lora(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, metadata: Mapping[str, str] | None = None
) -> LoraPlan:
    """Match every module of the LoRA state dict `tensors` (read from `source`) to a layer of `model` and check that
    it fits, changing nothing.

    Tensors may be on the meta device (shapes only; their values are then not checked): alphas are read. Raises
    WeightsError naming `source` when the file is no LoRA at all (`parse_lora`), or is of a format whose names
    `model` does not give (a kohya or diffusers LoRA for a model that does not implement `ForeignModuleNames`);
    every other problem is a `Refusal` of the plan.
    """
    parsed = parse_lora(dict(tensors), source, dict(metadata or {}))
    model_name = type(model).__name__
    refused: list[Refusal] = []
    names: dict[str, str] | None = None
    if parsed.convention is not None:
        if not isinstance(model, ForeignModuleNames):
            raise WeightsError(
                f"{source} is a {parsed.format} LoRA, but {model_name} does not name its layers the "
                f"{parsed.convention} way (it does not implement refiners_core.module_names.ForeignModuleNames): "
                "only LoRAs keyed by our own layer paths load onto it"
            )
        names = dict(model.foreign_module_names(parsed.convention))
        downs = {module: lora.tensors["down"] for module, lora in parsed.modules.items() if "down" in lora.tensors}
        try:
            check_base_model(source, downs, model, names, lambda path: resolve_layer(model, path))
        except WeightsError as error:
            refused.append(_refusal((), error, source))
    unmatched = dict.fromkeys(parsed.unknown, UNKNOWN_KEY)
    modules: list[PlannedModule] = []
    claimed: dict[int, str] = {}
    for module, lora in parsed.modules.items():
        path = module if names is None else names.get(module)
        layer = resolve_layer(model, path) if path is not None else None
        if path is None or layer is None:
            why = (
                f"{model_name} has no layer at '{path}'"
                if path is not None
                else f"{model_name} has no module named '{module}' in the {parsed.convention} convention"
            )
            unmatched.update((key, why) for key in lora.keys.values())
            continue
        keys = tuple(key for key in lora.keys.values() if key in tensors)  # not an alpha from the metadata
        key = next(iter(lora.keys.values()))
        where = f"`{model_name}.{path}`" if path else f"`{model_name}`"
        try:
            if not isinstance(layer, (fl.Linear, fl.Conv2d)):
                raise WeightsError(
                    f"{source}: '{key}' targets layer {where}, a {type(layer).__name__}: LoRA patches Linear and "
                    "Conv2d layers only"
                )
            if id(layer) in claimed:
                raise WeightsError(f"{source}: '{claimed[id(layer)]}' and '{module}' both patch layer {where}")
            claimed[id(layer)] = module
            check_module(layer, lora, where, source)
        except WeightsError as error:
            refused.append(_refusal(keys, error, source))
            continue
        modules.append(PlannedModule(module, path, layer, lora))
    return LoraPlan(parsed, modules, unmatched, refused)


def _refusal(keys: tuple[str, ...], error: WeightsError, source: str) -> Refusal:
    message = str(error)
    if message.startswith(f"{source}: "):
        return Refusal(keys, message, message.removeprefix(f"{source}: "))
    return Refusal(keys, message, f"the file{message.removeprefix(source)}" if message.startswith(source) else message)


def resolve_layer(model: nn.Module, path: str) -> nn.Module | None:
    """The layer at `path`, looking through adapters injected on the way (e.g. another LoRA on the same layer)."""
    node = unwrap_adapters(model)
    for name in path.split(".") if path else []:
        child = node._modules.get(name)  # pyright: ignore[reportPrivateUsage]
        if child is None:
            return None
        node = unwrap_adapters(child)
    return node


def unwrap_adapters(layer: nn.Module) -> nn.Module:
    """The layer that `layer` adapts, through any number of adapters (`layer` itself if it is no adapter)."""
    while isinstance(layer, Adapter):
        layer = layer.target  # pyright: ignore[reportUnknownMemberType]
    return layer  # pyright: ignore[reportUnknownVariableType]


def check_module(layer: LoraTarget, lora: ModuleLora, where: str, source: str) -> None:
    """Raise WeightsError naming `source` and the key unless `lora`'s down, up and alpha fit `layer` (at `where`).

    1x1 kernels and linear weights mix. The values of meta tensors (shapes read from a file's header) are not checked.
    """
    for role in ("down", "up"):
        if role not in lora.tensors:
            present = next(iter(lora.keys.values()))
            raise WeightsError(f"{source}: '{present}' has no {role} weights beside it (LoRA for layer {where})")
    down, up = lora.tensors["down"], lora.tensors["up"]
    if down.ndim < 2:
        raise WeightsError(f"{source}: '{lora.keys['down']}' has shape {tuple(down.shape)}, not a LoRA down weight")
    rank = down.shape[0]
    if rank == 0:
        raise WeightsError(f"{source}: '{lora.keys['down']}' has shape {tuple(down.shape)}: a rank-0 LoRA")
    roles: tuple[Role, Role] = ("down", "up")
    read = {lora.keys[role]: lora.tensors[role] for role in roles if not lora.tensors[role].is_meta}
    check_weights(read, source=source)  # a meta tensor (`refiners_lora.inspect`) has no values to check
    if isinstance(layer, fl.Linear):
        expected_down: tuple[int, ...] = (rank, layer.in_features)
        expected_up: tuple[int, ...] = (layer.out_features, rank)
        kind = f"Linear {layer.in_features} -> {layer.out_features}"
    else:
        if layer.groups != 1:
            raise WeightsError(f"{source}: '{lora.keys['down']}' targets grouped convolution {where}: not supported")
        expected_down = (rank, layer.in_channels, *layer.kernel_size)
        expected_up = (layer.out_channels, rank, 1, 1)
        kind = f"Conv2d {layer.in_channels} -> {layer.out_channels}, kernel {tuple(layer.kernel_size)}"
    checks: tuple[tuple[Role, torch.Tensor, tuple[int, ...]], ...] = (
        ("down", down, expected_down),
        ("up", up, expected_up),
    )
    for role, tensor, expected in checks:
        if not _fits(tensor.shape, expected):
            raise WeightsError(
                f"{source}: '{lora.keys[role]}' has shape {tuple(tensor.shape)} but layer {where} ({kind}) expects "
                f"{expected} for a rank-{rank} LoRA"
            )
    if "alpha" in lora.tensors:
        alpha, key = lora.tensors["alpha"], lora.keys["alpha"]
        if alpha.numel() != 1:
            raise WeightsError(f"{source}: '{key}' has shape {tuple(alpha.shape)}, expected a single number")
        if alpha.dtype == torch.bool or alpha.is_complex():
            raise WeightsError(f"{source}: '{key}' holds a {str(alpha.dtype).removeprefix('torch.')}, not a number")
        if not math.isfinite(float(alpha.item())):
            raise WeightsError(f"{source}: '{key}' is {alpha.item()}, not a finite alpha")


def _fits(found: torch.Size, expected: tuple[int, ...]) -> bool:
    return tuple(found) == expected or _squeezed(tuple(found)) == _squeezed(expected)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without trailing 1s past two dimensions: a 1x1 kernel `(o, i, 1, 1)` reads as `(o, i)`."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
