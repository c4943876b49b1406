"""The building blocks of the latent diffusion autoencoder: residual blocks, pixel attention, resolution stages."""

from __future__ import annotations

import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl

Device = torch.device | str | None

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


class Upsample(fl.Upsample):
    """Double the resolution: 2x nearest-neighbour interpolation, then a 3x3 convolution.

    While the chain holds its plain `Interpolate` and `Conv2d`, the result is computed at the input resolution
    instead: each of the four output phases (even/odd row, even/odd column) sees the upsampled input through a
    3x3 kernel whose taps fall on only 2x2 input pixels, so it is a 2x2 convolution of the input with summed
    taps. That is 2.25x fewer multiply-adds and no upsampled copy of the input, for the same result up to float
    rounding. When a layer of the chain has been replaced (e.g. an adapter wraps the Conv2d), the chain runs
    layer by layer as written.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        layers = list(self)
        if len(layers) != 2 or type(layers[0]) is not fl.Interpolate or type(layers[1]) is not fl.Conv2d:
            return super().forward(x)
        return upsample_conv(x, layers[1].weight, layers[1].bias)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` for a 3x3 `weight`,
    computed as four 2x2 convolutions of `x` (see `Upsample`)."""
    batch, _, height, width = x.shape
    out = x.new_empty(batch, weight.shape[0], height, 2, width, 2)
    for row in (0, 1):
        row_kernel = _fold_taps(weight, 2, row)
        for col in (0, 1):
            # Even output rows see input rows (i - 1, i), odd ones (i, i + 1): pad above or below accordingly.
            padded = F.pad(x, (1 - col, col, 1 - row, row))
            out[:, :, :, row, :, col] = F.conv2d(padded, _fold_taps(row_kernel, 3, col), bias)
    return out.view(batch, weight.shape[0], 2 * height, 2 * width)


def _fold_taps(kernel: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 3 taps of `kernel` along `dim` as seen by an even (`phase` 0) or odd output of a 2x nearest upsampling."""
    first, middle, last = kernel.unbind(dim)
    return torch.stack((first, middle + last) if phase == 0 else (first + middle, last), dim)


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
            [Upsample(out_channels, device=device, dtype=dtype)] if upsample else [],
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
