"""Changing the spatial resolution of `(B, C, H, W)` feature maps."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from refiners_core.fluxion.chain import Chain
from refiners_core.fluxion.context import ContextError
from refiners_core.fluxion.layers.convolution import Conv2d, conv2d
from refiners_core.fluxion.module import Device, Module


class Interpolate(Module):
    """Resize to `size`, by `scale_factor`, or to the height and width of the tensor stored under a context key.

    `size_of=(context, key)` reads the target size at every call from the tensor `context[key]` of the model
    (e.g. a skip connection), which follows the input size, odd ones included. Raises `ValueError` unless exactly
    one of `scale_factor`, `size` and `size_of` is given.
    """

    def __init__(
        self,
        scale_factor: float | None = None,
        size: tuple[int, int] | None = None,
        mode: str = "nearest",
        size_of: tuple[str, str] | None = None,
    ) -> None:
        super().__init__()
        if sum(option is not None for option in (scale_factor, size, size_of)) != 1:
            raise ValueError("Interpolate needs exactly one of scale_factor, size and size_of")
        self.scale_factor = scale_factor
        self.size = size
        self.mode = mode
        self.size_of = size_of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.target_size(), scale_factor=self.scale_factor, mode=self.mode)

    def target_size(self) -> tuple[int, int] | None:
        """The output height and width when given by `size` or `size_of`, None for a `scale_factor`."""
        if self.size_of is None:
            return self.size
        context, key = self.size_of
        values = self.use_context(context, key=key)
        if key not in values:
            known = ", ".join(sorted(values)) or "none"
            raise ContextError(
                f"Interpolate at `{self.get_path()}` resizes to the size of '{context}.{key}', which is not set "
                f"(keys: {known}); set it with `model.set_context('{context}', {{'{key}': ...}})`"
            )
        height, width = values[key].shape[-2:]
        return height, width

    def doubles_nearest(self, x: torch.Tensor) -> bool:
        """Whether this layer is a nearest-neighbour upsampling of `x` by exactly 2 in height and width."""
        if self.mode != "nearest":
            return False
        if self.scale_factor is not None:
            return self.scale_factor == 2.0
        return self.target_size() == (2 * x.shape[-2], 2 * x.shape[-1])

    def extra_repr(self) -> str:
        if self.size_of is not None:
            what = f"size_of={self.size_of[0]}.{self.size_of[1]}"
        elif self.size is not None:
            what = f"size={self.size}"
        else:
            what = f"scale_factor={self.scale_factor}"
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
    """Upsample with nearest-neighbour interpolation (2x, or to the size of a context tensor), then a 3x3 convolution.

    `size_of=(context, key)` resizes to the height and width of the tensor `context[key]` instead of doubling (see
    `Interpolate`), e.g. to match a skip connection whose size was odd before downsampling.

    While the chain holds the plain `Interpolate` and `Conv2d` it was built with and the interpolation exactly
    doubles the input, the result is computed at the input resolution (`upsample_nearest_conv3x3`): 2.25x fewer
    multiply-adds and no upsampled copy of the input, for the same result up to float rounding. Otherwise (an
    adapter replaced a layer, or the target size is not twice the input) the chain runs layer by layer.
    """

    def __init__(
        self,
        channels: int,
        size_of: tuple[str, str] | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            Interpolate(scale_factor=2.0, mode="nearest") if size_of is None else Interpolate(size_of=size_of),
            Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        layers = tuple(self)
        if len(layers) == 2:
            interpolate, conv = layers
            if (
                type(interpolate) is Interpolate
                and type(conv) is Conv2d
                and _is_plain_conv3x3(conv)
                and interpolate.doubles_nearest(x)
            ):
                return upsample_nearest_conv3x3(x, conv.weight, conv.bias)
        return super().forward(x)


def _is_plain_conv3x3(conv: Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def upsample_nearest_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` for a 3x3 `weight`.

    Each of the four output phases (even/odd row, even/odd column) sees the upsampled input through 3x3 taps that
    fall on only 2x2 input pixels, so it is a 2x2 convolution of `x` with the taps summed per pixel.
    """
    batch, _, height, width = x.shape
    out_channels, in_channels = weight.shape[:2]
    # All four phases' 2x2 kernels in one product over the 9 taps (a single pass over the weights).
    kernels = (weight.reshape(-1, 9) @ _phase_taps(weight)).view(out_channels, in_channels, 2, 2, 2, 2)
    out = x.new_empty(batch, out_channels, height, 2, width, 2)
    for row in (0, 1):
        for col in (0, 1):
            # Even output rows see input rows (i - 1, i), odd ones (i, i + 1): pad above or below accordingly.
            padded = F.pad(x, (1 - col, col, 1 - row, row))
            out[:, :, :, row, :, col] = conv2d(padded, kernels[:, :, row, col], bias)
    return out.view(batch, out_channels, 2 * height, 2 * width)


def _phase_taps(weight: torch.Tensor) -> torch.Tensor:
    """The (9, 16) 0/1 matrix that sums a flattened 3x3 kernel into the 2x2 kernels of the four output phases.

    Along one axis, an even output (phase 0) of a 2x nearest upsampling sees its 3 taps as (first, middle + last),
    an odd one (phase 1) as (first + middle, last). Columns are ordered (row phase, column phase, row, column).
    """
    fold = torch.tensor(
        [[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=weight.dtype, device=weight.device
    )  # (phase, folded tap, tap)
    return torch.einsum("pay,qbx->yxpqab", fold, fold).reshape(9, 16)
