"""`LoraAdapter`: add a trainable low-rank update to a Linear or Conv2d layer."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter

LoraTarget = fl.Linear | fl.Conv2d


class Lora(fl.Module):
    """The low-rank branch `scale * up(down(x))` for a target layer.

    For a Linear target, `down` is `in_features -> rank` and `up` is `rank -> out_features`. For a Conv2d
    target (LoCon), `down` has the target's kernel, stride, padding and dilation and `up` is a 1x1
    convolution. `down` starts random and `up` at zero, so a fresh LoRA leaves outputs unchanged.

    `scale` lives in a 0-dim buffer (not in the `state_dict`) that setting `scale` updates in place: a compiled
    model (`torch.compile`, CUDA graphs) reads the new value without recompiling or re-capturing.
    """

    _scale: torch.Tensor
    pure = True  # up(down(x) * scale): its input and its own tensors only (see `fl.Module.pure`)

    # Normal tensors even when made under inference mode: their version counters let the text's keys and values be
    # reused through this LoRA (refiners_sd15's CrossAttention), and a LoRA made there can still be trained.
    @torch.inference_mode(False)
    def __init__(
        self,
        target: LoraTarget,
        rank: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = rank
        self.register_buffer("_scale", torch.tensor(float(scale), device=device), persistent=False)
        self.down: fl.Linear | fl.Conv2d
        self.up: fl.Linear | fl.Conv2d
        if isinstance(target, fl.Linear):
            self.down = fl.Linear(target.in_features, rank, bias=False, device=device, dtype=dtype)
            self.up = fl.Linear(rank, target.out_features, bias=False, device=device, dtype=dtype)
        else:
            if target.groups != 1:
                raise ValueError(f"LoRA does not support grouped convolutions (groups={target.groups})")
            self.down = fl.Conv2d(
                target.in_channels,
                rank,
                kernel_size=target.kernel_size,  # type: ignore[arg-type]
                stride=target.stride,  # type: ignore[arg-type]
                padding=target.padding,  # type: ignore[arg-type]
                dilation=target.dilation,  # type: ignore[arg-type]
                use_bias=False,
                device=device,
                dtype=dtype,
            )
            self.up = fl.Conv2d(rank, target.out_channels, kernel_size=1, use_bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)

    @property
    def scale(self) -> float:
        return float(self._scale.item())

    @scale.setter
    def scale(self, value: float) -> None:
        with torch.inference_mode():  # allowed whether or not the buffer was made under inference mode
            self._scale.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the rank-sized hidden state costs `rank / out_features` of scaling the output.
        return self.up(self.down(x) * self._scale)

    def added_to(self, base: torch.Tensor, x: torch.Tensor, overwrite_base: bool = False) -> torch.Tensor:
        """`base + self(x)`; for a Linear `up`, the addition is done by the up projection's matmul (`addmm`).

        With `overwrite_base`, the sum is written into `base`'s memory (no new output tensor, no copy of `base`):
        only for a `base` that nothing else holds, outside autograd.
        """
        up = self.up
        hidden = self.down(x) * self._scale
        # the bias of a Linear made with bias=False is None, though torch's stub types it as a Parameter
        bias = cast(torch.Tensor | None, up.bias) if type(up) is fl.Linear else None
        if type(up) is not fl.Linear or bias is not None or base.dtype != hidden.dtype or base.dim() < 2:
            return base.add_(up(hidden)) if overwrite_base else base + up(hidden)
        flat, hidden = base.reshape(-1, base.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        if overwrite_base:
            return flat.addmm_(hidden, up.weight.t()).view(base.shape)
        return torch.addmm(flat, hidden, up.weight.t()).view(base.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


class LoraAdapter(fl.Sum, Adapter[LoraTarget]):
    """`target(x) + scale * up(down(x))` in the place of an `fl.Linear` or `fl.Conv2d` target.

    The target's own weights are left untouched; only the LoRA weights (`adapter.lora`) are new
    trainable parameters. `inject()` puts the adapter in the model, `eject()` restores it exactly.
    """

    pure = True  # the target's output plus the LoRA's: pure when both are (`fl.is_pure` checks them too)

    def __init__(
        self,
        target: LoraTarget,
        rank: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # checked at run time too, for callers without a type checker
        if not isinstance(target, (fl.Linear, fl.Conv2d)):  # pyright: ignore[reportUnnecessaryIsInstance]
            where = f" at `{target.get_path()}`" if isinstance(target, fl.Module) else ""  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"LoraAdapter adapts fl.Linear and fl.Conv2d layers, not {type(target).__name__}{where}")
        lora = Lora(target, rank, scale=scale, device=device or target.device, dtype=dtype or target.dtype)
        with self.setup_adapter(target):
            super().__init__(target, lora)

    @property
    def lora(self) -> Lora:
        """The low-rank branch (a direct child: with LoRAs stacked on one target, each adapter has its own)."""
        return next(layer for layer in self if isinstance(layer, Lora))

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def scale(self) -> float:
        return self.lora.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.lora.scale = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        layers = tuple(self)
        target, lora = layers[0], layers[-1]
        if len(layers) != 2 or not isinstance(lora, Lora):  # the tree was edited: add outputs the usual way
            return super().forward(x)
        layer: fl.Module = target
        try:
            base = target(x)
            layer = lora
            # Without autograd, the target's fresh output can take the sum in place.
            return lora.added_to(base, x, overwrite_base=_returns_new_tensor(target) and not torch.is_grad_enabled())
        except Exception as error:
            self._annotate(error, layer, x)
            raise


def _returns_new_tensor(layer: fl.Module) -> bool:
    """Whether `layer(x)` is always a tensor of its own (no view of its input, no cached tensor)."""
    return type(layer) in (fl.Linear, fl.Conv2d) or type(layer) is LoraAdapter
