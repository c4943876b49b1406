"""`LoraAdapter`: add a trainable low-rank update to a Linear or Conv2d layer."""

from __future__ import annotations

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
    """

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
        self.scale = scale
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


class LoraAdapter(fl.Sum, Adapter[LoraTarget]):
    """`target(x) + scale * up(down(x))` in the place of an `fl.Linear` or `fl.Conv2d` target.

    The target's own weights are left untouched; only the LoRA weights (`adapter.lora`) are new
    trainable parameters. `inject()` puts the adapter in the model, `eject()` restores it exactly.
    """

    def __init__(
        self,
        target: LoraTarget,
        rank: int,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(target, (fl.Linear, fl.Conv2d)):
            raise TypeError(f"LoraAdapter adapts fl.Linear and fl.Conv2d layers, not {type(target).__name__}")
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
