"""`DeltaAdapter`: a LyCORIS-family (LoHa, LoKr, Tucker LoCon, full diff) or DoRA update of a Linear or Conv2d layer.

The update is rebuilt as a weight from the file's tensors at each call (as PEFT and LyCORIS do unfused) and run with
the target's own operation; `LoraManager.fuse()` adds it into the target's weight instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter
from refiners_lora.adapter import LoraTarget
from refiners_lora.families import Recognized, dora


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
        for role in self.roles:
            self.register_buffer(role, tensors[role].detach().clone())
        device = tensors[self.roles[0]].device
        self.register_buffer("_scale", torch.tensor(float(scale), device=device), persistent=False)

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
    or convolution with its stride, padding, dilation and groups); the target is left untouched."""

    def __init__(self, target: LoraTarget, recognized: Recognized, tensors: Mapping[str, torch.Tensor], scale: float):
        weight = target.weight  # the file's tensors take the target's device and dtype, as `LoraAdapter`'s do
        delta = WeightDelta(recognized, {role: t.to(weight.device, weight.dtype) for role, t in tensors.items()}, scale)
        with self.setup_adapter(target):
            super().__init__(target, delta)

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
        inner, target, delta = self[0], self.target, self.delta  # inner: the target, or an adapter stacked on it
        weight, bias = delta.weight(target.weight), delta.bias(target.bias)
        if isinstance(target, fl.Linear):
            return inner(x) + F.linear(x, weight, bias)
        update = F.conv2d(x, weight, bias, target.stride, target.padding, target.dilation, target.groups)  # pyright: ignore[reportArgumentType]
        return inner(x) + update


def snapshot_biases(adapters: list[nn.Module]) -> dict[LoraTarget, torch.Tensor]:
    """A copy of the bias of every target whose bias a `DeltaAdapter` among `adapters` changes (its `diff_b`)."""
    return {
        adapter.target: adapter.target.bias.detach().clone()
        for adapter in adapters
        if isinstance(adapter, DeltaAdapter) and "diff_b" in adapter.delta.roles and adapter.target.bias is not None
    }
