"""Convolutions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from refiners_core.fluxion.module import Device, Module

Size2d = int | tuple[int, int]

# Thresholds of the im2col path of `conv2d`, measured on a 2-core AMD EPYC (Zen 3, AVX2) with torch 2.13: a float32
# kernel of 1280 x 1280 x 3 x 3 applied to 64-256 output pixels runs 1.3-2.2x faster as one matrix product; a kernel
# that fits the L3 cache (640 x 640 x 3 x 3) or 512 output pixels gain nothing.
IM2COL_MIN_WEIGHTS = 1 << 22  # 4 Mi weights, 16 MiB in float32
IM2COL_MAX_PIXELS = 256  # batch x output height x output width


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, ...] = (1, 1),
    padding: str | tuple[int, ...] = (0, 0),
    dilation: tuple[int, ...] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """`F.conv2d`, computed as an im2col matrix product where that is faster on the CPU.

    oneDNN, behind `F.conv2d` on the CPU, re-lays out the kernel at every call. For a large float32 kernel
    (`IM2COL_MIN_WEIGHTS`) applied to few output pixels (`IM2COL_MAX_PIXELS` over the whole batch, such as the
    8x8 level of the SD1.5 UNet) that costs more than the products themselves, so the input is unfolded into
    columns (`F.unfold`) and multiplied by the kernel in one `addmm` for the whole batch. The result is the same
    up to float rounding (sums in another order), differentiable, and traced by `torch.compile` without a break
    (the choice depends only on the device, dtype and shapes).
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and groups == 1
        and not isinstance(padding, str)
        and weight.numel() >= IM2COL_MIN_WEIGHTS
    ):
        batch, _, height, width = x.shape
        out_channels, _, kernel_height, kernel_width = weight.shape
        out_height = (height + 2 * padding[0] - dilation[0] * (kernel_height - 1) - 1) // stride[0] + 1
        out_width = (width + 2 * padding[1] - dilation[1] * (kernel_width - 1) - 1) // stride[1] + 1
        if batch * out_height * out_width <= IM2COL_MAX_PIXELS:
            columns = F.unfold(x, (kernel_height, kernel_width), dilation=dilation, padding=padding, stride=stride)
            # (B, C k k, L) -> (C k k, B L): one product for the whole batch reads the kernel once.
            columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)
            kernel = weight.reshape(out_channels, -1)
            out = kernel @ columns if bias is None else torch.addmm(bias.unsqueeze(1), kernel, columns)
            return out.view(out_channels, batch, out_height, out_width).transpose(0, 1).contiguous()
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # pyright: ignore[reportArgumentType]


class Conv2d(Module, nn.Conv2d):
    """`torch.nn.Conv2d`, run through `conv2d` (faster on the CPU for large kernels on small inputs)."""

    pure = True

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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
