"""The block of each layer of an SD1.5-family UNet (the `LayerBlocks` protocol of `refiners_core.layer_blocks`), read
from the model's own diffusers module names: SD1.5's and SDXL's UNets share diffusers' `UNet2DConditionModel` layout
(`down_blocks.<level>.attentions.<index>`, `mid_block.resnets.<index>`, `up_blocks.<level>.upsamplers.0`...)."""

from __future__ import annotations

from collections.abc import Mapping

from refiners_core.layer_blocks import Kind, LayerBlock, Section

_SECTIONS: dict[str, Section] = {
    "conv_in": "in",
    "time_embedding": "time",
    "add_embedding": "time",
    "conv_norm_out": "out",
    "conv_out": "out",
}
_KINDS: dict[str, Kind] = {
    "resnets": "resnet",
    "attentions": "attention",
    "downsamplers": "sampler",
    "upsamplers": "sampler",
}


def unet_layer_blocks(diffusers_names: Mapping[str, str], component: str = "unet") -> dict[str, LayerBlock]:
    """Layer path -> block, from a UNet's `foreign_module_names(DIFFUSERS)` (module name -> layer path).

    Raises ValueError naming the module for a diffusers name of no known part of the UNet.
    """
    blocks: dict[str, LayerBlock] = {}
    for name, path in diffusers_names.items():
        blocks[path] = _block(name, component)
    return blocks


def _block(name: str, component: str) -> LayerBlock:
    parts = name.split(".")
    if parts[0] in _SECTIONS:
        return LayerBlock(component, _SECTIONS[parts[0]])
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3 and parts[2] in _KINDS:
        section: Section = "down" if parts[0] == "down_blocks" else "up"
        return LayerBlock(component, section, int(parts[1]), int(parts[3]), _KINDS[parts[2]])
    if parts[0] == "mid_block" and len(parts) > 2 and parts[1] in ("resnets", "attentions"):
        return LayerBlock(component, "mid", None, int(parts[2]), _KINDS[parts[1]])
    raise ValueError(f"module '{name}' is in no known block of the UNet")
