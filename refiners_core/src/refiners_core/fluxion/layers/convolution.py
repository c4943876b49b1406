"""Convolutions."""

from __future__ import annotations

import torch
from torch import nn

from refiners_core.fluxion.module import Device, Module

Size2d = int | tuple[int, int]


class Conv2d(Module, nn.Conv2d):
    """`torch.nn.Conv2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2d,
        stride: Size2d = 1,
        padding: Size2d | str = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: Size2d = 1,
        padding_mode: str = "zeros",
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=use_bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )


class ConvTranspose2d(Module, nn.ConvTranspose2d):
    """`torch.nn.ConvTranspose2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2d,
        stride: Size2d = 1,
        padding: Size2d = 0,
        output_padding: Size2d = 0,
        groups: int = 1,
        use_bias: bool = True,
        dilation: Size2d = 1,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            bias=use_bias,
            dilation=dilation,
            device=device,
            dtype=dtype,
        )
