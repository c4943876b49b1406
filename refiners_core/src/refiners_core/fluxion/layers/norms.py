"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from refiners_core.fluxion.module import Device, Module


class LayerNorm(Module, nn.LayerNorm):
    """`torch.nn.LayerNorm` over the last dimension(s)."""

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)


class GroupNorm(Module, nn.GroupNorm):
    """`torch.nn.GroupNorm` over the channels of a `(B, C, ...)` input."""

    def __init__(
        self,
        channels: int,
        num_groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_groups, channels, eps=eps, affine=affine, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"


class LayerNorm2d(Module):
    """Layer normalisation over the channels of a `(B, C, H, W)` input, at each pixel (as in SAM and ConvNeXt)."""

    def __init__(
        self, channels: int, eps: float = 1e-6, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return normalized.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, eps={self.eps}"
