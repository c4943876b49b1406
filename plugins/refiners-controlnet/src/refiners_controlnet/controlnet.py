"""`ControlNet`: a trainable copy of a UNet's encoder (SD1.5's or SDXL's), steered by a conditioning image
(arXiv:2302.05543).

It reads the latents, the timestep and the text embedding (for SDXL also the pooled text embedding and the time ids)
as the UNet does, adds the embedding of the conditioning
image after its input convolution, and projects each skip connection and the middle block's output through a zero
convolution. The resulting residuals, one per skip connection of the UNet and one for its middle block, are stored
in the ControlNet's own context; `ControlNetAdapter` adds them to the UNet's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_controlnet.mapping import (
    CONTROLNET_FORMAT,
    ENCODER_LAYERS,
    SD15_CONTROLNET,
    ControlNetConfig,
    is_sdxl,
    sdxl_module,
)
from refiners_core.fluxion import Device
from refiners_sd15.loading import PretrainedComponent
from refiners_sd15.unet import DownBlocks, MiddleBlock, SD1UNet, TimestepEncoder, UNetConfig, skip_channels

_CONTEXT_NAMES = itertools.count(1)


def unet_config(unet: object) -> UNetConfig:
    """The config of `unet`, a `SD1UNet` or (when refiners-sdxl is installed) a `SDXLUNet`: the UNets a ControlNet
    copies and adapts. Raises TypeError naming the type of anything else."""
    if isinstance(unet, SD1UNet):
        return unet.config
    try:
        from refiners_sdxl import SDXLUNet
    except ImportError:
        raise TypeError(f"a ControlNet adapts a SD1UNet, got {type(unet).__name__}") from None
    if not isinstance(unet, SDXLUNet):
        raise TypeError(f"a ControlNet adapts a SD1UNet or a SDXLUNet, got {type(unet).__name__}")
    return unet.config


class Condition(fl.UseContext):
    """Return the conditioning image stored under `<context>.condition` (see `ControlNet.set_condition`), at
    `factor` times the size of the input features, on their device and with their dtype.

    An image of another size is resized (bilinear, antialiased), as diffusers' pipelines resize it to the size of
    the generated image.
    """

    def __init__(self, context: str, factor: int) -> None:
        super().__init__(context, "condition")
        self.factor = factor

    def forward(self, *args: Any) -> Any:
        (x,) = args
        values = self.use_context(self.context, key=self.key)
        if self.key not in values:
            raise fl.ContextError(
                f"the ControlNet at `{self.get_path()}` has no conditioning image: call set_condition(image) on it "
                "(or on its ControlNetAdapter) first"
            )
        condition: torch.Tensor = values[self.key].to(device=x.device, dtype=x.dtype)
        size = (x.shape[-2] * self.factor, x.shape[-1] * self.factor)
        if condition.shape[-2:] != size:
            condition = F.interpolate(condition, size=size, mode="bilinear", antialias=True)
        return condition

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}"


class ConditionBlock(fl.Chain):
    """`3x3 Conv2d -> SiLU -> 3x3 Conv2d with stride 2 -> SiLU`: halve the size, change the channels."""

    def __init__(
        self, in_channels: int, out_channels: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, device=device, dtype=dtype),
            fl.SiLU(),
        )


class ConditionEncoder(fl.Residual):
    """`x + encode(condition)`: embed the conditioning image down to the latents' size and add it to the features.

    The image (`(B, conditioning_channels, 8 H, 8 W)` in [0, 1] with SD1.5's `channels`) goes through a 3x3
    convolution, a SiLU, one `ConditionBlock` per further entry of `channels` (each halves the size), and a final
    3x3 convolution to `out_channels`, initialised to zero.
    """

    def __init__(
        self,
        context: str,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 96, 256),
        conditioning_channels: int = 3,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        output = _zeroed(fl.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1, device=device, dtype=dtype))
        super().__init__(
            Condition(context, factor=2 ** (len(channels) - 1)),
            fl.Conv2d(conditioning_channels, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.SiLU(),
            *(ConditionBlock(c_in, c_out, device=device, dtype=dtype) for c_in, c_out in zip(channels, channels[1:])),
            output,
        )


def _zeroed(convolution: fl.Conv2d) -> fl.Conv2d:
    for parameter in convolution.parameters():
        torch.nn.init.zeros_(parameter)
    return convolution


def _zero_convolution(channels: int, device: Device, dtype: torch.dtype | None) -> fl.Conv2d:
    return _zeroed(fl.Conv2d(channels, channels, kernel_size=1, device=device, dtype=dtype))


class SkipZeroConvolution(fl.Chain):
    """The ControlNet's skip connection `unet.skip_<index>` through a 1x1 convolution initialised to zero."""

    def __init__(self, index: int, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        self.index = index
        super().__init__(fl.UseContext("unet", f"skip_{index}"), _zero_convolution(channels, device, dtype))

    def extra_repr(self) -> str:
        return f"index={self.index}"


class MiddleZeroConvolution(fl.Chain):
    """The middle block's output through a 1x1 convolution initialised to zero."""

    def __init__(self, channels: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(_zero_convolution(channels, device, dtype))


class ZeroConvolutions(fl.Parallel):
    """The residuals of the ControlNet: one per skip connection, in order, then the middle block's."""

    def __init__(
        self, skips: Sequence[int], middle_channels: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            *(SkipZeroConvolution(index, channels, device=device, dtype=dtype) for index, channels in enumerate(skips)),
            MiddleZeroConvolution(middle_channels, device=device, dtype=dtype),
        )


class ControlNet(PretrainedComponent, fl.Passthrough):
    """The ControlNet of Stable Diffusion 1.5 or SDXL, as diffusers' `ControlNetModel`.

        controlnet = ControlNet.from_pretrained("lllyasviel/control_v11p_sd15_canny")  # or an SDXL ControlNet
        ControlNetAdapter(sd.unet, controlnet, scale=0.8).inject().set_condition(edges)  # (1, 3, H, W) in [0, 1]

    Its architecture is `config` (a `ControlNetConfig`: the config of the UNet whose encoder it copies, plus the
    channels of the conditioning image and of its encoder's stages), kept as `controlnet.config`. An SDXL ControlNet
    (`text_time` added embedding, `SDXL_CONTROLNET` and its smaller variants) has refiners-sdxl's `TextTimeEmbedding`
    after its timestep encoder; building one raises ImportError if refiners-sdxl is not installed.
    Zero convolutions are initialised to zero, so a new ControlNet (`from_unet`) leaves the UNet's output as it
    is. As a layer it returns its input (the latents) unchanged; the residuals of a call are then in `residuals`.
    It reads the `diffusion` context (timestep and text embedding) and, while it runs, writes over the `unet`
    context entries its encoder shares with the UNet's (`timestep_embedding`, `skip_<k>`): inside a UNet it must
    run before the UNet's own encoder, which is where `ControlNetAdapter` puts it.
    """

    component_format = CONTROLNET_FORMAT

    def __init__(
        self, config: ControlNetConfig = SD15_CONTROLNET, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        self.config = config
        self.context_name = f"controlnet_{next(_CONTEXT_NAMES)}"
        """The context holding this ControlNet's `condition` and `residuals` (unique to each ControlNet)."""
        unet = config.unet
        channels = unet.block_out_channels
        down_blocks = DownBlocks(unet, device=device, dtype=dtype)
        input_stage = down_blocks[0]
        assert isinstance(input_stage, fl.Chain)
        # The conditioning image's embedding is added right after the input convolution, before skip_0 is stored.
        input_stage.insert(
            1,
            ConditionEncoder(
                self.context_name,
                channels[0],
                config.conditioning_embedding_out_channels,
                config.conditioning_channels,
                device=device,
                dtype=dtype,
            ),
        )
        added_embedding: list[fl.Module] = []
        if is_sdxl(config):
            assert unet.projection_class_embeddings_input_dim is not None and unet.addition_time_embed_dim is not None
            added_embedding.append(
                sdxl_module().TextTimeEmbedding(
                    unet.projection_class_embeddings_input_dim,
                    4 * channels[0],
                    unet.addition_time_embed_dim,
                    device=device,
                    dtype=dtype,
                )
            )
        super().__init__(
            TimestepEncoder(channels[0], 4 * channels[0], device=device, dtype=dtype),
            *added_embedding,
            down_blocks,
            MiddleBlock(unet, device=device, dtype=dtype),
            ZeroConvolutions(skip_channels(channels, unet.layers_per_block), channels[-1], device=device, dtype=dtype),
            fl.SetContext(self.context_name, "residuals"),
        )

    def init_context(self) -> fl.Contexts:
        return {"diffusion": {}, "unet": {}, self.context_name: {}}

    @classmethod
    def from_unet(cls, unet: SD1UNet | fl.Chain) -> ControlNet:
        """A new ControlNet for `unet`: its architecture, a copy of its encoder's weights, zero residuals.

        This is how a ControlNet starts its training. It is created on the UNet's device, with its dtype. `unet` is a
        `SD1UNet` or refiners-sdxl's `SDXLUNet`; raises TypeError for anything else.
        """
        controlnet = cls(ControlNetConfig(unet=unet_config(unet)), device=unet.device, dtype=unet.dtype)
        encoder = {key: value for key, value in unet.state_dict().items() if key.startswith(ENCODER_LAYERS)}
        controlnet.load_state_dict(encoder, strict=False)
        return controlnet

    def set_condition(self, condition: torch.Tensor) -> None:
        """Set the conditioning image: `(B, conditioning_channels, H, W)` in [0, 1], 8 times the latents' size.

        A batch of 1 applies to every latent of the batch; an image of another size is resized to 8 times the
        latents' size when the ControlNet runs. Raises ValueError for a tensor that is not 4D with
        `conditioning_channels` channels.
        """
        channels = self.config.conditioning_channels
        if condition.dim() != 4 or condition.shape[1] != channels:
            raise ValueError(
                f"ControlNet: the conditioning image must be (B, {channels}, H, W), "
                f"got a tensor of shape {tuple(condition.shape)}"
            )
        self.set_context(self.context_name, {"condition": condition})

    @property
    def residuals(self) -> tuple[torch.Tensor, ...]:
        """The residuals of the last call, unscaled: one per skip connection of the UNet, then the middle block's."""
        return self.use_context(self.context_name, key="residuals")["residuals"]
