"""Match a LoRA file to a model, module by module, changing nothing: the one place that says, for every group of keys,
which family it is, which layer it targets, its rank and alpha, or why it cannot be applied.

`LoraManager.add` loads through `plan_lora` and refuses the file with its first refusal; a tool that only inspects a
file (`refiners lora inspect`, `refiners_lora.inspection`) reads the whole plan, from tensors that may be on the meta
device (shapes read from a file's header, alphas read): their values are then not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter
from refiners_core.module_names import ForeignModuleNames
from refiners_core.weights import WeightsError, check_weights
from refiners_lora.adapter import LoraTarget
from refiners_lora.base_models import check_base_model
from refiners_lora.families import Recognized, UnsupportedLora, delta_shape, dora, recognize
from refiners_lora.formats import Format, ModuleLora, ParsedLora, Role, parse_lora, unsupported_family

PLAIN_ROLES = frozenset({"down", "up", "alpha"})
"""The roles of a plain LoRA / LoCon module, which `LoraAdapter` runs; any other role makes a `DeltaAdapter`."""

UNKNOWN_KEY = "not a weight of a known family (LoRA, LoHa, LoKr, full diff, DoRA) in the file's format"
"""The reason given for a key of no recognised form."""


@dataclass(frozen=True)
class ModulePlan:
    """One module of the file on the model: `path` is its layer's path (None: no layer of the model has its name),
    `layer` that layer, `recognized` its family, rank and alpha (None if its keys make no family), and `problem` the
    error that loading it raises (the file's name first), None when it can be applied."""

    module: str
    lora: ModuleLora
    path: str | None
    layer: nn.Module | None
    recognized: Recognized | None
    problem: str | None

    @property
    def keys(self) -> list[str]:
        """The file's keys of the module (an alpha from the file's metadata included)."""
        return list(self.lora.keys.values())

    @property
    def family(self) -> str | None:
        """The family's name in lower case, e.g. "lora", "loha", "lokr", "full diff", with " (tucker)" and " + dora"
        when they apply; None if the keys make no family."""
        return None if self.recognized is None else self.recognized.description.lower()

    @property
    def rank(self) -> int | None:
        """The rank (None for a full diff, a whole LoKr, or keys that make no family)."""
        return None if self.recognized is None else self.recognized.rank

    @property
    def alpha(self) -> float | None:
        """The alpha the file gives (None: none given, the factor alpha / rank is 1; or keys that make no family)."""
        return None if self.recognized is None else self.recognized.alpha


@dataclass(frozen=True)
class Refusal:
    """Keys of the file that cannot be applied whatever `strict` is (empty `keys`: the whole file), and why: `message`
    is the error `LoraManager.add` raises (the file's name first), `reason` the same without the file's name."""

    keys: tuple[str, ...]
    message: str
    reason: str


@dataclass(frozen=True)
class LoraPlan:
    """Every module of a file on a model, in the file's order, the keys of no recognised form (`unknown`), the
    problem of the whole file (`problem`: a LoRA for another base model, the error's message) and the keys of a
    family refiners-lora does not apply (`unsupported`: key -> the error's message), in the file's order."""

    source: str
    model: str
    """The model's class name."""
    format: Format
    convention: str | None
    modules: list[ModulePlan]
    unknown: list[str]
    file_keys: frozenset[str]
    problem: str | None = None
    unsupported: Mapping[str, str] | None = None

    @property
    def applicable(self) -> list[ModulePlan]:
        """The modules that match a layer and fit it."""
        return [module for module in self.modules if module.path is not None and module.problem is None]

    @property
    def unmatched(self) -> list[str]:
        """The keys that match no layer: those of no recognised form, then those of modules the model does not have."""
        return self.unknown + [key for module in self.modules if module.path is None for key in module.keys]

    @property
    def unmatched_reasons(self) -> dict[str, str]:
        """Each key of `unmatched` -> why it matches no layer (without the file's name)."""
        reasons = dict.fromkeys(self.unknown, UNKNOWN_KEY)
        for module in self.modules:
            if module.path is None:
                why = (
                    f"{self.model} has no layer at '{module.module}'"
                    if self.convention is None
                    else f"{self.model} has no module named '{module.module}' in the {self.convention} convention"
                )
                reasons.update(dict.fromkeys(module.keys, why))
        return reasons

    @property
    def refused(self) -> list[Refusal]:
        """What cannot be applied whatever `strict` is, in the order `LoraManager.add` checks it: the keys of an
        unsupported family, the whole file, then each module with a problem (its keys read from the file's tensors)."""
        refusals = [Refusal((key,), message, _reason(message, self.source)) for key, message in self.unsupported_keys]
        if self.problem is not None:
            refusals.append(Refusal((), self.problem, _reason(self.problem, self.source)))
        for module in self.modules:
            if module.problem is not None:
                keys = tuple(key for key in module.keys if key in self.file_keys)  # not an alpha from the metadata
                refusals.append(Refusal(keys, module.problem, _reason(module.problem, self.source)))
        return refusals

    @property
    def unsupported_keys(self) -> list[tuple[str, str]]:
        """(key, message) of every key of an unsupported family."""
        return list((self.unsupported or {}).items())


def _reason(message: str, source: str) -> str:
    """`message` without the file's name: "the file ..." where it is the subject."""
    if message.startswith(f"{source}: "):
        return message.removeprefix(f"{source}: ")
    return f"the file{message.removeprefix(source)}" if message.startswith(source) else message


def plan_lora(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, metadata: Mapping[str, str] | None = None
) -> LoraPlan:
    """Match every module of the LoRA state dict `tensors` (read from `source`, with its file's `metadata`) to a layer
    of `model` and check that it fits, changing nothing. Tensors may be on the meta device (their values are then not
    checked).

    Raises WeightsError naming `source` when the file cannot be planned at all (what `parse_lora` raises: not a LoRA,
    mixed formats, a bad PEFT metadata; a foreign format on a model without `ForeignModuleNames`), or, if it holds a
    key of a family refiners-lora does not apply, naming the first such key when its other keys cannot be planned
    either. Otherwise the keys of such a family are `unsupported`, a LoRA for another base model is the plan's
    `problem`, and a module's own problem (a layer that is not a Linear or Conv2d, or that another module already
    patches, keys that make no family, shapes that do not fit, weights that are not finite) is its `problem`.
    """
    unsupported = {key: message for key in tensors if (message := unsupported_family(key, source)) is not None}
    try:
        parsed, names = _parse(model, {k: t for k, t in tensors.items() if k not in unsupported}, source, metadata)
    except WeightsError:
        if unsupported:  # the first refusal `parse_lora` gives for the file
            raise WeightsError(next(iter(unsupported.values()))) from None
        raise
    model_name = type(model).__name__
    whole: str | None = None
    if names is not None:
        try:
            check_base_model(source, input_weights(parsed), model, names, lambda path: resolve_layer(model, path))
        except WeightsError as error:
            whole = str(error)
    modules: list[ModulePlan] = []
    claimed: dict[int, str] = {}
    for module, lora in parsed.modules.items():
        path = module if names is None else names.get(module)
        layer = resolve_layer(model, path) if path is not None else None
        if path is None or layer is None:
            modules.append(ModulePlan(module, lora, None, None, _recognized(lora), None))
            continue
        key = next(iter(lora.keys.values()))
        where = f"`{model_name}.{path}`" if path else f"`{model_name}`"
        problem: str | None = None
        if not isinstance(layer, (fl.Linear, fl.Conv2d)):
            problem = (
                f"{source}: '{key}' targets layer {where}, a {type(layer).__name__}: LoRA patches Linear and "
                "Conv2d layers only"
            )
        elif id(layer) in claimed:
            problem = f"{source}: '{claimed[id(layer)]}' and '{module}' both patch layer {where}"
        else:
            claimed[id(layer)] = module
            try:
                _check(layer, lora, where, source)
            except WeightsError as error:
                problem = str(error)
        modules.append(ModulePlan(module, lora, path, layer, _recognized(lora), problem))
    return LoraPlan(
        source,
        model_name,
        parsed.format,
        parsed.convention,
        modules,
        list(parsed.unknown),
        frozenset(tensors),
        whole,
        unsupported,
    )


def _parse(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str, metadata: Mapping[str, str] | None
) -> tuple[ParsedLora, dict[str, str] | None]:
    """The file per module and, for a foreign format, the model's names in its convention (file name -> path)."""
    parsed = parse_lora(tensors, source, dict(metadata) if metadata is not None else None)
    if parsed.convention is None:
        return parsed, None
    if not isinstance(model, ForeignModuleNames):
        raise WeightsError(
            f"{source} is a {parsed.format} LoRA, but {type(model).__name__} does not name its layers the "
            f"{parsed.convention} way (it does not implement refiners_core.module_names.ForeignModuleNames): "
            "only LoRAs keyed by our own layer paths load onto it"
        )
    return parsed, dict(model.foreign_module_names(parsed.convention))


def input_weights(parsed: ParsedLora) -> dict[str, torch.Tensor]:
    """Module -> a weight of it whose second dimension is its layer's input width (a LoRA down, a LoHa `hada_w1_b`):
    the clues `refiners_lora.base_models` reads to tell the base model."""
    return {
        module: weight
        for module, lora in parsed.modules.items()
        if (weight := lora.tensors.get("down", lora.tensors.get("hada_w1_b"))) is not None
    }


def _recognized(lora: ModuleLora) -> Recognized | None:
    try:
        return recognize(lora.tensors, lora.keys)
    except UnsupportedLora:
        return None


def resolve_layer(model: nn.Module, path: str) -> nn.Module | None:
    """The layer of `model` at `path`, looking through adapters injected on the way (e.g. another LoRA on the same
    layer); None if there is none."""
    node = _unwrap(model)
    for name in path.split(".") if path else []:
        child = node._modules.get(name)  # pyright: ignore[reportPrivateUsage]
        if child is None:
            return None
        node = _unwrap(child)
    return node


def _unwrap(layer: nn.Module) -> nn.Module:
    while isinstance(layer, Adapter):
        layer = cast(Adapter[fl.Module], layer).target  # isinstance leaves the target type unknown
    return layer


def _check(layer: LoraTarget, lora: ModuleLora, where: str, source: str) -> None:
    """Raise WeightsError unless `lora`'s down, up and alpha fit `layer` (1x1 kernels and linear weights mix)."""
    if not lora.tensors.keys() <= PLAIN_ROLES:
        try:
            _check_family(layer, lora, recognize(lora.tensors, lora.keys), where, source)
        except UnsupportedLora as error:
            raise WeightsError(f"{source}: {error} (for layer {where})") from None
        return
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
    check_weights({lora.keys[r]: t for r, t in (("down", down), ("up", up)) if not t.is_meta}, source=source)
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


def _check_family(layer: LoraTarget, lora: ModuleLora, recognized: Recognized, where: str, source: str) -> None:
    """Raise UnsupportedLora (WeightsError for non-finite weights) unless a LyCORIS / DoRA module fits `layer`."""
    weights = {lora.keys[role]: t for role, t in lora.tensors.items() if role != "alpha" and not t.is_meta}
    check_weights(weights, source=source)  # a meta tensor (shapes read from a file's header) has no values to check
    first, weight = lora.keys[min(lora.tensors.keys() - {"alpha"})], layer.weight
    if isinstance(layer, fl.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        raise UnsupportedLora(f"'{first}' targets a grouped or not zero-padded convolution: not supported")
    found, expected = tuple(delta_shape(recognized, lora.tensors, lora.keys)), tuple(weight.shape)
    fits = found[:1] == expected[:1] and math.prod(found[1:]) == math.prod(expected[1:])
    if not fits or (len(found) > 2 and _squeezed(found) != _squeezed(expected)):
        raise UnsupportedLora(
            f"'{first}' and the keys beside it make a {recognized.description} update of shape {found}, but the "
            f"layer's weight has shape {expected}"
        )
    for role in ("dora_scale", "magnitude"):
        if role in lora.tensors and dora.per_output(role, lora.tensors[role], expected) is None:
            shape = tuple(lora.tensors[role].shape)
            raise UnsupportedLora(
                f"'{lora.keys[role]}' has shape {shape}: a DoRA magnitude has one value per output ({expected[0]}) "
                f"or, as a dora_scale, per input ({expected[1]}) channel"
            )
    if "diff_b" in lora.tensors:
        if layer.bias is None:
            raise UnsupportedLora(f"'{lora.keys['diff_b']}' changes a bias the layer does not have")
        if lora.tensors["diff_b"].numel() != expected[0]:
            shape = tuple(lora.tensors["diff_b"].shape)
            raise UnsupportedLora(f"'{lora.keys['diff_b']}' has shape {shape}, the layer's bias ({expected[0]},)")


def _fits(found: torch.Size, expected: tuple[int, ...]) -> bool:
    return tuple(found) == expected or _squeezed(tuple(found)) == _squeezed(expected)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without trailing 1s past two dimensions: a 1x1 kernel `(o, i, 1, 1)` reads as `(o, i)`."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape
