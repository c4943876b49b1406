"""`DeltaAdapter`: a LyCORIS-family (LoHa, LoKr, Tucker LoCon, full diff) or DoRA update of a Linear or Conv2d layer.

The update is rebuilt as a weight from the file's tensors at each call (as PEFT and LyCORIS do unfused) and run with
the target's own operation; `LoraManager.fuse()` adds it into the target's weight instead.

A DoRA on a plain LoRA / LoCon with a norm per output channel runs as PEFT does instead: the target's output `y` is
reused and only the low-rank path is added, `y + s * ((c - 1) * (y - b) + c * up(down(x)))` with `c = m / ||W + dW||`
per output channel. `c` depends on weights only: with gradients off (and outside `torch.compile` tracing) it is kept
between calls, and computed again when the target's weight or the DoRA's tensors change (a new tensor, storage,
dtype, device or shape, or an in-place change their version counters record: `add_`, `copy_`, an optimizer step; a
write through `.data`, which autograd does not see either, is not seen).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter
from refiners_lora.adapter import LoraTarget
from refiners_lora.families import Recognized, dora

CacheKey = tuple[tuple[int, int, torch.dtype, torch.device, torch.Size, tuple[int, ...]], ...]


class WeightDelta(fl.Module):
    """The tensors of one module of a file (buffers, named by role) and the update they make to a target's weight.

    `scale` lives in a 0-dim buffer like `Lora`'s: for a family without DoRA it is the user's scale times alpha /
    rank; with DoRA it is the user's scale, alpha / rank (`factor`) acting inside the norm.
    """

    _scale: torch.Tensor

    def __init__(self, recognized: Recognized, tensors: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
        super().__init__()
        self.recognized = recognized
        self.roles = tuple(role for role in tensors if role != "alpha")
        device = tensors[self.roles[0]].device
        with torch.inference_mode(False):  # normal tensors even when loaded under inference mode: they have versions
            for role in self.roles:
                self.register_buffer(role, tensors[role].detach().clone())
            self.register_buffer("_scale", torch.tensor(float(scale), device=device), persistent=False)
        self._output_scale: tuple[tuple[torch.Tensor, ...], CacheKey, torch.Tensor] | None = None

    @property
    def scale(self) -> float:
        return float(self._scale.item())

    @scale.setter
    def scale(self, value: float) -> None:
        with torch.inference_mode():
            self._scale.fill_(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Role -> tensor (the alpha left out: it is in `recognized`)."""
        buffers = dict(self.named_buffers(recurse=False))
        return {role: buffers[role] for role in self.roles}

    def weight(self, base: torch.Tensor) -> torch.Tensor:
        """The scaled update of `base` (the target's weight), in its shape and dtype."""
        tensors = self.tensors()
        delta = self.recognized.family.weight(tensors).reshape(base.shape)
        if self.recognized.dora:
            role = "dora_scale" if "dora_scale" in tensors else "magnitude"
            delta = dora.change(base, delta.to(torch.float32) * self.recognized.factor, role, tensors[role])
        return (delta * self._scale).to(base.dtype)

    def output_scale(self, base: torch.Tensor) -> torch.Tensor:
        """DoRA's `m / ||W + dW||` per output channel (`W` = `base`), float32 at least; kept while neither `base` nor
        this module's tensors change, when gradients are off and outside compilation (see the module's docstring)."""
        tensors = self.tensors()
        role = "dora_scale" if "dora_scale" in tensors else "magnitude"
        watched = (base, *tensors.values())
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        cacheable = cacheable and not any(tensor.is_inference() for tensor in watched)
        if cacheable and self._output_scale is not None:
            _, key, cached = self._output_scale
            if key == _cache_key(watched):
                return cached
        delta = self.recognized.family.weight(tensors).reshape(base.shape).to(torch.float32) * self.recognized.factor
        scale = dora.output_scale(base, delta, role, tensors[role])
        if cacheable:  # the aliases keep the storages alive, so that no other tensor can take their addresses
            self._output_scale = tuple(tensor.detach() for tensor in watched), _cache_key(watched), scale
        return scale

    def low_rank(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a DoRA on a plain LoRA / LoCon with a norm per output channel (`W` = `base`): `down` shaped as a
        weight of the target's operation, `up` `(out, rank)` times `s c alpha / rank` per output channel (both in
        `base`'s dtype), and `s (c - 1)` per output channel (float32), `s` the user's scale, `c` `output_scale`."""
        tensors = self.tensors()
        scale = self.output_scale(base)
        up = tensors["up"].reshape(base.shape[0], -1)
        up = (up * (self._scale * scale * self.recognized.factor)[:, None]).to(base.dtype)
        down = tensors["down"].reshape(up.shape[1], *base.shape[1:])
        return down, up, self._scale * (scale - 1)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Self:  # pyright: ignore[reportIncompatibleMethodOverride]
        self._output_scale = None  # `.to()` and the like: let go of the old storages
        return super()._apply(fn, recurse)  # pyright: ignore[reportUnknownMemberType]

    def bias(self, base: torch.Tensor | None) -> torch.Tensor | None:
        """The scaled update of the target's bias (a full diff's `diff_b`), None without one."""
        if "diff_b" not in self.roles:
            return None
        diff_b = self.tensors()["diff_b"]
        return (diff_b.reshape(-1) * self._scale).to(diff_b.dtype if base is None else base.dtype)

    def extra_repr(self) -> str:
        return f"{self.recognized.description}, rank={self.recognized.rank}, scale={self.scale}"


class DeltaAdapter(fl.Sum, Adapter[LoraTarget]):
    """`target(x) + op(x, dW)` in the place of an `fl.Linear` or `fl.Conv2d` target, `op` the target's own (linear,
    or convolution with its stride, padding, dilation and groups); the target is left untouched. A DoRA on a plain
    LoRA / LoCon with a norm per output channel runs its low-rank path instead (see the module's docstring)."""

    def __init__(self, target: LoraTarget, recognized: Recognized, tensors: Mapping[str, torch.Tensor], scale: float):
        weight = target.weight  # the file's tensors take the target's device and dtype, as `LoraAdapter`'s do
        delta = WeightDelta(recognized, {role: t.to(weight.device, weight.dtype) for role, t in tensors.items()}, scale)
        with self.setup_adapter(target):
            super().__init__(target, delta)
        self.low_rank = _low_rank(target, recognized, delta.tensors())

    @property
    def delta(self) -> WeightDelta:
        return next(layer for layer in self if isinstance(layer, WeightDelta))

    @property
    def scale(self) -> float:
        return self.delta.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.delta.scale = value

    def weight_delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The update of the target's weight (of `base` instead, e.g. the weight before other LoRAs were fused)."""
        return self.delta.weight(self.target.weight if base is None else base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        if self.low_rank:
            return self._low_rank_forward(x)
        inner, target, delta = self[0], self.target, self.delta  # inner: the target, or an adapter stacked on it
        weight, bias = delta.weight(target.weight), delta.bias(target.bias)
        if isinstance(target, fl.Linear):
            return inner(x) + F.linear(x, weight, bias)
        update = F.conv2d(x, weight, bias, target.stride, target.padding, target.dilation, target.groups)  # pyright: ignore[reportArgumentType]
        return inner(x) + update

    def _low_rank_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`y + s (c - 1) W x + up'(down(x))`, `y` the inner output and `up'` as `WeightDelta.low_rank` gives it;
        with the target itself inside, `W x` is `y - b`: `y (1 + s (c - 1)) + up'(down(x)) - s (c - 1) b`."""
        inner, target = self[0], self.target
        down, up, along = self.delta.low_rank(target.weight)
        y = inner(x)
        if inner is target:
            shift = None if target.bias is None else (-along * target.bias).to(up.dtype)
            return torch.addcmul(_run(target, x, down, up, shift), y, _per_channel(1 + along, target, y))
        plain = _run(target, x, target.weight)
        return torch.addcmul(_run(target, x, down, up) + y, plain, _per_channel(along, target, y))


def _run(
    target: LoraTarget,
    x: torch.Tensor,
    weight: torch.Tensor,
    up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The target's operation with `weight` (no bias), then `up` (`(out, rank)`, a 1x1 convolution) plus `bias`."""
    if isinstance(target, fl.Linear):
        hidden = F.linear(x, weight)
        return hidden if up is None else F.linear(hidden, up, bias)
    hidden = F.conv2d(x, weight, None, target.stride, target.padding, target.dilation, target.groups)  # pyright: ignore[reportArgumentType]
    return hidden if up is None else F.conv2d(hidden, up[:, :, None, None], bias)


def _per_channel(values: torch.Tensor, target: LoraTarget, output: torch.Tensor) -> torch.Tensor:
    """`values` (one per output channel) in `output`'s dtype, shaped to broadcast over the target's output."""
    values = values.to(output.dtype)
    return values if isinstance(target, fl.Linear) else values[:, None, None]


def _low_rank(target: LoraTarget, recognized: Recognized, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the DoRA low-rank path applies: a DoRA on a LoRA / LoCon without Tucker mid, its norm per output
    channel, on a Linear or an ungrouped convolution."""
    if not recognized.dora or recognized.family.name != "LoRA" or "mid" in tensors:
        return False
    if isinstance(target, fl.Conv2d) and target.groups != 1:
        return False
    role = "dora_scale" if "dora_scale" in tensors else "magnitude"
    return bool(dora.per_output(role, tensors[role], tuple(target.weight.shape)))


def _cache_key(tensors: tuple[torch.Tensor, ...]) -> CacheKey:
    return tuple(
        (tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape, tensor.stride())
        for tensor in tensors
    )


def snapshot_biases(adapters: list[nn.Module]) -> dict[LoraTarget, torch.Tensor]:
    """A copy of the bias of every target whose bias a `DeltaAdapter` among `adapters` changes (its `diff_b`)."""
    return {
        adapter.target: adapter.target.bias.detach().clone()
        for adapter in adapters
        if isinstance(adapter, DeltaAdapter) and "diff_b" in adapter.delta.roles and adapter.target.bias is not None
    }
