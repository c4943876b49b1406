"""`ControlNetAdapter`: run a ControlNet inside a SD1UNet (or SDXLUNet) and add its residuals to the UNet's through
the contexts.

Injecting puts two layers into the UNet, and ejecting takes them out again:

    SD1UNet (SDXLUNet)
      ControlNet            <- first: computes its residuals into its context
      TimestepEncoder
      (TextTimeEmbedding    SDXL only)
      DownBlocks            (stores the skip connections unet.skip_0, unet.skip_1...)
      MiddleBlock
      ControlNetResiduals   <- adds scale * residuals to the skip connections and to the middle block's output
      UpBlocks              (reads the skip connections)
      OutputBlock

Several adapters can be injected into one UNet: their residuals add up, each with its own scale, as with
diffusers' `MultiControlNetModel`.
"""

from __future__ import annotations

from typing import Self

import torch

import refiners_core.fluxion as fl
from refiners_controlnet.controlnet import ControlNet, unet_config
from refiners_core.checks import check_finite, check_finite_tensor
from refiners_sd15.unet import SD1UNet, UNetConfig, skip_channels


def _fit(config: UNetConfig) -> tuple[object, ...]:
    """What a ControlNet and the UNet it steers must share: the skip connections' channels, the text width and the
    added embedding."""
    return (
        skip_channels(config.block_out_channels, config.layers_per_block),
        config.cross_attention_dim,
        config.addition_embed_type,
        config.projection_class_embeddings_input_dim,
        config.addition_time_embed_dim,
    )


def _describe(config: UNetConfig) -> str:
    model = "SDXL" if config.addition_embed_type == "text_time" else "SD1.5"
    added = (
        f", projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}, "
        f"addition_time_embed_dim={config.addition_time_embed_dim}"
        if config.addition_embed_type
        else ""
    )
    return (
        f"{model}: block_out_channels={list(config.block_out_channels)}, layers_per_block={config.layers_per_block}, "
        f"cross_attention_dim={config.cross_attention_dim}{added}"
    )


class ControlNetResiduals(fl.Module):
    """Add the residuals of a ControlNet (its context's `residuals`), times `scale`, to a UNet.

    Placed after the UNet's middle block: the residuals of the skip connections are added to the `unet.skip_<k>`
    context entries that the up blocks read, the last residual to the middle block's output (the input).
    """

    def __init__(self, context: str, scale: float = 1.0) -> None:
        """Raises ValueError if `scale` is NaN or infinite."""
        super().__init__()
        self.context = context
        self.scale = check_finite("ControlNet scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *down, middle = self.use_context(self.context, key="residuals")["residuals"]
        skips = self.use_context("unet")
        for index, residual in enumerate(down):
            key = f"skip_{index}"
            skips[key] = skips[key] + self.scale * residual
        return x + self.scale * middle

    def extra_repr(self) -> str:
        return f"context={self.context!r}, scale={self.scale}"


class ControlNetAdapter(fl.Module, fl.Adapter[fl.Chain]):
    """Steer a `SD1UNet` or `SDXLUNet` with a `ControlNet` made for it: `ControlNetAdapter(unet, controlnet,
    scale=1.0).inject()`.

    The adapter patches the UNet in place (see the module docstring) and holds the ControlNet as a submodule, so
    `adapter.parameters()` are the ControlNet's (to train it) and `adapter.to(...)` moves it. Set the conditioning
    image with `set_condition` and the strength with `scale` at any time. `eject` restores the UNet exactly.
    Raises TypeError if the target is not a `SD1UNet` or `SDXLUNet`, ValueError if the ControlNet was not made for a
    UNet of this architecture (an SD1.5 ControlNet on SDXL, or the reverse), or `scale` is NaN or infinite.
    """

    def __init__(self, target: SD1UNet | fl.Chain, controlnet: ControlNet, scale: float = 1.0) -> None:
        theirs = unet_config(target)
        if not isinstance(controlnet, ControlNet):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"ControlNetAdapter needs a ControlNet, got {type(controlnet).__name__}")
        ours = controlnet.config.unet
        if _fit(ours) != _fit(theirs):
            raise ValueError(
                f"this ControlNet ({_describe(ours)}) does not fit the UNet at `{target.get_path()}` "
                f"({_describe(theirs)})"
            )
        with self.setup_adapter(target):
            super().__init__()
        self.controlnet = controlnet
        self.residuals = ControlNetResiduals(controlnet.context_name, scale)

    @property
    def scale(self) -> float:
        """How much of the ControlNet's residuals is added to the UNet's (diffusers' `conditioning_scale`)."""
        return self.residuals.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.residuals.scale = check_finite("ControlNet scale", value)

    def set_condition(self, condition: torch.Tensor) -> Self:
        """Set the conditioning image, `(B, 3, H, W)` in [0, 1] at the size of the generated image.

        Raises ValueError if it has NaN or infinite values.
        """
        check_finite_tensor("the ControlNet condition", condition)
        self.controlnet.set_condition(condition)
        return self

    @property
    def is_injected(self) -> bool:
        return any(layer is self.controlnet for layer in self.target)

    def inject(self, parent: fl.Chain | None = None) -> Self:
        """Put the ControlNet first in the UNet and its `ControlNetResiduals` after the UNet's middle block.

        `parent`, if given, must be the UNet itself. Raises AdapterError if the adapter is already injected or the
        UNet has no `MiddleBlock` child; the UNet is then left unchanged.
        """
        unet = self.target
        self.check_in_place_injection(parent, type(unet).__name__)
        try:
            middle = unet["MiddleBlock"]
        except KeyError as error:
            raise fl.AdapterError(f"cannot inject a ControlNetAdapter: {error.args[0]}") from None
        position = next(index for index, layer in enumerate(unet) if layer is middle)
        unet.insert(position + 1, self.residuals)
        unet.insert(0, self.controlnet)
        return self

    def eject(self) -> None:
        """Take the ControlNet and its residuals out of the UNet; the UNet is then exactly as before `inject`.

        The conditioning image stays with the ControlNet for a later `inject`. Raises AdapterError if the adapter
        is not injected, or the UNet was edited so that its layers are no longer there.
        """
        unet = self.target
        if not self.is_injected:
            raise fl.AdapterError(f"cannot eject this ControlNetAdapter from `{unet.get_path()}`: it is not injected")
        if not any(layer is self.residuals for layer in unet):
            raise fl.AdapterError(
                f"cannot eject this ControlNetAdapter: its ControlNetResiduals is no longer a child of "
                f"`{unet.get_path()}` (was the UNet edited after inject?)"
            )
        name = self.controlnet.context_name
        condition = self.controlnet.use_context(name).get("condition")
        unet.remove(self.controlnet)
        unet.remove(self.residuals)
        root = unet.root
        if isinstance(root, fl.Chain):
            root.provider.contexts.pop(name, None)
        if condition is not None:
            self.controlnet.provider.set(name, {"condition": condition})
