"""Which block of a model each layer belongs to: the protocol per-block LoRA weights are resolved through.

A model package implements one method, `layer_blocks()`, giving every `fl.Linear` and `fl.Conv2d` of the model the
`LayerBlock` it belongs to (its component, the section of the UNet, the level and the index within it). Consumers
(`refiners-lora`'s per-block scales) only test `isinstance(model, LayerBlocks)`: they never import the model
package, and never read block structure from layer names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Section = Literal["in", "time", "down", "mid", "up", "out"]
"""Where in a UNet a layer is: `in` (the input convolution), `time` (time and added embeddings), the `down`, `mid`
and `up` blocks, `out` (the output convolution)."""

Kind = Literal["resnet", "attention", "sampler", "other"]
"""What a layer is part of inside a section: a residual block, a transformer (attention) block, the level's down- or
upsampler, or anything else (the input and output convolutions, the embeddings, a text encoder's layers)."""


@dataclass(frozen=True)
class LayerBlock:
    """The block of one layer, in the terms of diffusers' `UNet2DConditionModel`.

    `component` is e.g. `unet`, `text_encoder`, `text_encoder_2`. For a UNet layer, `section` says where it is;
    in the `down` and `up` sections `level` is the index of the block (`down_blocks.<level>`) and `index` the
    index of the residual block and transformer pair within it (`resnets.<index>`, `attentions.<index>`; 0 for the
    sampler); in `mid`, `index` is the residual block's or the transformer's index. Outside a UNet (a text encoder)
    `section`, `level` and `index` are None.
    """

    component: str
    section: Section | None = None
    level: int | None = None
    index: int | None = None
    kind: Kind = "other"


@runtime_checkable
class LayerBlocks(Protocol):
    """A model that tells the block of each of its layers."""

    def layer_blocks(self) -> Mapping[str, LayerBlock]:
        """Layer path (relative to this object, as `named_modules` gives it) -> its block, for every `fl.Linear` and
        `fl.Conv2d` of the model. Must be cheap and must not touch weights."""
        ...
