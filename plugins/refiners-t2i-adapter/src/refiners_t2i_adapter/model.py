"""`T2IAdapterModel`: the T2I-Adapter network (arXiv:2302.08453), from a condition image to one feature per UNet level.

    T2IAdapterModel                       (full_adapter, 4 levels)
      PixelUnshuffle                      the image as (in_channels * 64, H / 8, W / 8) patches
      Conv2d                              conv_in
      FeatureStages                       returns the output of each stage: the features
        AdapterBlock_1 ... AdapterBlock_4 (AvgPool2x2 to halve the size) (1x1 Conv2d) AdapterResnetBlock x N

The light adapter has no `conv_in` and `LightAdapterBlock`s (a 1x1 convolution down to a quarter of the channels,
`LightResnetBlock`s, a 1x1 convolution back up); the SDXL adapter halves the size in its third block only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_sd15.loading import PretrainedComponent
from refiners_t2i_adapter.config import SD15_FULL_ADAPTER, T2IAdapterConfig
from refiners_t2i_adapter.mapping import T2I_ADAPTER_FORMAT


class PixelUnshuffle(fl.Module):
    """`(B, C, H, W)` -> `(B, C * f * f, H / f, W / f)`: each `f x f` patch as channels."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"the T2I-Adapter's condition image is {width}x{height}: each side must be a multiple of its "
                f"downscale_factor {self.factor}"
            )
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class AvgPool2x2(fl.Module):
    """Halve the size by averaging 2x2 windows; an odd side keeps its last row or column (rounded up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class AdapterResnetBlock(fl.Residual):
    """`x + Conv1x1(ReLU(Conv3x3(x)))`."""

    def __init__(self, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            fl.Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.ReLU(),
            fl.Conv2d(channels, channels, kernel_size=1, device=device, dtype=dtype),
        )


class LightResnetBlock(fl.Residual):
    """`x + Conv3x3(ReLU(Conv3x3(x)))`."""

    def __init__(self, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(
            fl.Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.ReLU(),
            fl.Conv2d(channels, channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )


class AdapterBlock(fl.Chain):
    """A stage of the full adapters: halve the size (if `down`), change the channels (1x1 convolution, if they
    change), then `num_res_blocks` `AdapterResnetBlock`s."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        down: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        layers: list[fl.Module] = [AvgPool2x2()] if down else []
        if in_channels != out_channels:
            layers.append(fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype))
        layers += [AdapterResnetBlock(out_channels, device=device, dtype=dtype) for _ in range(num_res_blocks)]
        super().__init__(layers)


class LightAdapterBlock(fl.Chain):
    """A stage of the light adapter: halve the size (if `down`), a 1x1 convolution to `out_channels / 4`,
    `num_res_blocks` `LightResnetBlock`s, a 1x1 convolution to `out_channels`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        down: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        inner = out_channels // 4
        super().__init__(
            *([AvgPool2x2()] if down else []),
            fl.Conv2d(in_channels, inner, kernel_size=1, device=device, dtype=dtype),
            *(LightResnetBlock(inner, device=device, dtype=dtype) for _ in range(num_res_blocks)),
            fl.Conv2d(inner, out_channels, kernel_size=1, device=device, dtype=dtype),
        )


class FeatureStages(fl.Chain):
    """Run the stages one after the other and return the output of every stage (the features, finest first)."""

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        (x,) = args
        features: list[torch.Tensor] = []
        for stage in self:
            x = stage(x)
            features.append(x)
        return tuple(features)


def _stages(config: T2IAdapterConfig, device: Device, dtype: torch.dtype | None) -> list[fl.Chain]:
    block = LightAdapterBlock if config.adapter_type == "light_adapter" else AdapterBlock
    return [
        block(c_in, c_out, config.num_res_blocks, down=down, device=device, dtype=dtype)
        for c_in, c_out, down in config.stages
    ]


class T2IAdapterModel(PretrainedComponent, fl.Chain):
    """The T2I-Adapter network of diffusers' `T2IAdapter`: a condition image `(B, in_channels, H, W)` in [0, 1] in,
    one feature per UNet level out (a tuple, see `T2IAdapterConfig.features` for their channels and sizes).

        model = T2IAdapterModel.from_pretrained("TencentARC/t2iadapter_canny_sd15v2")
        features = model(condition)

    Its architecture is `config` (a `T2IAdapterConfig`, kept as `model.config`). `T2IAdapter` runs it inside a UNet.
    Raises ValueError at run time for an image whose sides are not multiples of `downscale_factor`.
    """

    component_format = T2I_ADAPTER_FORMAT

    def __init__(
        self, config: T2IAdapterConfig = SD15_FULL_ADAPTER, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        self.config = config
        unshuffled = config.in_channels * config.downscale_factor**2
        conv_in = (
            []
            if config.adapter_type == "light_adapter"
            else [fl.Conv2d(unshuffled, config.channels[0], kernel_size=3, padding=1, device=device, dtype=dtype)]
        )
        super().__init__(
            PixelUnshuffle(config.downscale_factor), *conv_in, FeatureStages(_stages(config, device, dtype))
        )
