"""The UNets IP-Adapter adapts: refiners-sd15's `SD1UNet` and, when refiners-sdxl is installed, its `SDXLUNet`, and
their text cross-attentions in the order of the released weights."""

from __future__ import annotations

from typing import Literal

import refiners_core.fluxion as fl
from refiners_sd15.unet import SD1UNet
from refiners_sd15.unet.blocks import CrossAttention

UNetFamily = Literal["sd15", "sdxl"]


def unet_family(unet: object) -> UNetFamily:
    """`"sd15"` for a `SD1UNet`, `"sdxl"` for a `SDXLUNet`. Raises TypeError naming the type for anything else."""
    if isinstance(unet, SD1UNet):
        return "sd15"
    try:
        from refiners_sdxl import SDXLUNet
    except ImportError:
        SDXLUNet = None
    if SDXLUNet is not None and isinstance(unet, SDXLUNet):
        return "sdxl"
    accepted = "SD1UNet (refiners-sd15) or SDXLUNet (refiners-sdxl)" if SDXLUNet else "SD1UNet (refiners-sd15)"
    raise TypeError(f"IP-Adapter adapts a {accepted}, got {type(unet).__name__}")


def text_cross_attentions(unet: fl.Chain) -> list[fl.Attention]:
    """The attention layers of the UNet's text cross-attentions, in the order of the released weights (diffusers'
    `attn_processors`): down blocks, up blocks, then the middle block. Raises AdapterError if a block is missing."""
    attentions: list[fl.Attention] = []
    for block in ("DownBlocks", "UpBlocks", "MiddleBlock"):
        try:
            chain = unet[block]
        except KeyError as error:
            raise fl.AdapterError(f"cannot adapt the UNet: {error.args[0]}") from None
        assert isinstance(chain, fl.Chain)
        for cross_attention in chain.layers(CrossAttention):
            attentions.append(cross_attention.ensure_find(fl.Attention))
    return attentions
