"""Changing the spatial resolution of `(B, C, H, W)` feature maps."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from refiners_core.fluxion.chain import Chain
from refiners_core.fluxion.layers.convolution import Conv2d
from refiners_core.fluxion.module import Module

Device = torch.device | str | None


class Interpolate(Module):
    """Resize to `size`, or by `scale_factor`, with the given interpolation mode."""

    def __init__(
        self,
        scale_factor: float | None = None,
        size: tuple[int, int] | None = None,
        mode: str = "nearest",
    ) -> None:
        super().__init__()
        if (scale_factor is None) == (size is None):
            raise ValueError("Interpolate needs exactly one of scale_factor and size")
        self.scale_factor = scale_factor
        self.size = size
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, scale_factor=self.scale_factor, mode=self.mode)

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}"


class Pad(Module):
    """`F.pad(x, padding, mode, value)`; `padding` is (left, right, top, bottom, ...) as in torch."""

    def __init__(self, padding: tuple[int, ...], mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        self.padding = padding
        self.mode = mode
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.padding, mode=self.mode, value=self.value if self.mode == "constant" else None)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, mode={self.mode!r}"


class Downsample(Chain):
    """Halve the resolution with a stride-2 3x3 convolution.

    `padding=1` pads every side; `padding=0` pads only the right and bottom edges by one pixel, as the
    Stable Diffusion autoencoder does.
    """

    def __init__(
        self, channels: int, padding: int = 1, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding, device=device, dtype=dtype)
        layers: tuple[Module, ...] = (Pad((0, 1, 0, 1)), conv) if padding == 0 else (conv,)
        super().__init__(*layers)


class Upsample(Chain):
    """Double the resolution with nearest-neighbour interpolation followed by a 3x3 convolution."""

    def __init__(self, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            Interpolate(scale_factor=2.0, mode="nearest"),
            Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )
