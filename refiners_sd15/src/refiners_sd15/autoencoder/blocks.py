"""The building blocks of the latent diffusion autoencoder: residual blocks, pixel attention, resolution stages."""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device

EPS = 1e-6
"""Epsilon of every group normalisation of the autoencoder."""


class ResidualBlock(fl.Sum):
    """Two (GroupNorm, SiLU, 3x3 Conv2d) stages added to the input, or to its 1x1 projection when channels change."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_groups: int = 32,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        shortcut: fl.Module = (
            fl.Identity()
            if in_channels == out_channels
            else fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)
        )
        super().__init__(
            fl.Chain(
                fl.GroupNorm(in_channels, num_groups, eps=EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
                fl.GroupNorm(out_channels, num_groups, eps=EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
            shortcut,
        )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class SelfAttention2d(fl.SelfAttention):
    """Single-head self-attention of a `(B, C, H, W)` feature map, each pixel being a token of C channels."""

    def __init__(self, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(channels, num_heads=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        attended: torch.Tensor = super().forward(x.flatten(2).transpose(1, 2))
        return attended.transpose(1, 2).reshape(x.shape)


class AttentionBlock(fl.Residual):
    """GroupNorm then self-attention over the pixels, added to the input."""

    def __init__(
        self, channels: int, num_groups: int = 32, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.GroupNorm(channels, num_groups, eps=EPS, device=device, dtype=dtype),
            SelfAttention2d(channels, device=device, dtype=dtype),
        )


class MidBlock(fl.Chain):
    """The lowest resolution stage: residual block, attention over the pixels, residual block."""

    def __init__(
        self, channels: int, num_groups: int = 32, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            ResidualBlock(channels, channels, num_groups, device=device, dtype=dtype),
            AttentionBlock(channels, num_groups, device=device, dtype=dtype),
            ResidualBlock(channels, channels, num_groups, device=device, dtype=dtype),
        )


class DownBlock(fl.Chain):
    """An encoder stage: `num_layers` residual blocks, then a stride-2 convolution unless it is the last stage."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        downsample: bool,
        num_groups: int = 32,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            (
                ResidualBlock(in_channels if i == 0 else out_channels, out_channels, num_groups, device, dtype)
                for i in range(num_layers)
            ),
            # padding=0: SD pads the right and bottom edges only, then convolves with stride 2.
            [fl.Downsample(out_channels, padding=0, device=device, dtype=dtype)] if downsample else [],
        )


class UpBlock(fl.Chain):
    """A decoder stage: `num_layers` residual blocks, then a 2x nearest upsampling and 3x3 convolution unless last."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        upsample: bool,
        num_groups: int = 32,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            (
                ResidualBlock(in_channels if i == 0 else out_channels, out_channels, num_groups, device, dtype)
                for i in range(num_layers)
            ),
            [fl.Upsample(out_channels, device=device, dtype=dtype)] if upsample else [],
        )


class OutputBlock(fl.Chain):
    """GroupNorm, SiLU and a 3x3 convolution to the output channels: the head of the encoder and the decoder."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_groups: int = 32,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.GroupNorm(in_channels, num_groups, eps=EPS, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )


class PosteriorMean(fl.Chain):
    """The 1x1 convolution to the moments (mean, log-variance) of the latent distribution, keeping only the mean."""

    def __init__(self, latent_channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            fl.Conv2d(2 * latent_channels, 2 * latent_channels, kernel_size=1, device=device, dtype=dtype),
            fl.Slicing(dim=1, end=latent_channels),
        )
