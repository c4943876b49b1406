"""Explicit key mappings from the diffusers and original (ldm) UNet checkpoints to `SD1UNet`'s state dict.

Both are built from the architecture (loops over levels and blocks) that a `UNetConfig` describes (e.g. the one
`unet_config_from_diffusers` or `unet_config_from_ldm` reads); SD1.5's by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from refiners_sd15.loading import ComponentFormat
from refiners_sd15.unet.config import (
    SD15_UNET,
    UNetConfig,
    skip_channels,
    unet_config_from_diffusers,
    unet_config_from_ldm,
)

# Keys inside a residual block: (diffusers, ldm, ours), each followed by ".weight" and ".bias".
RESIDUAL_KEYS = (
    ("norm1", "in_layers.0", "Chain.GroupNorm_1"),
    ("conv1", "in_layers.2", "Chain.Conv2d_1"),
    ("time_emb_proj", "emb_layers.1", "Chain.TimestepBias.Linear"),
    ("norm2", "out_layers.0", "Chain.GroupNorm_2"),
    ("conv2", "out_layers.3", "Chain.Conv2d_2"),
)
SHORTCUT_KEYS = ("conv_shortcut", "skip_connection", "Conv2d")

# Keys inside a spatial transformer, named alike in diffusers and ldm: (reference, ours, has a bias). Around the
# transformer blocks, then in each of them (`transformer_blocks.<i>`: our `TransformerBlock`, or
# `TransformerBlock_<i+1>` when there are several).
ATTENTION_KEYS = (
    ("norm", "GroupNorm", True),
    ("proj_in", "Tokens.Linear_1", True),
    ("proj_out", "Tokens.Linear_2", True),
)
TRANSFORMER_BLOCK_KEYS = (
    ("norm1", "Residual_1.LayerNorm", True),
    ("attn1.to_q", "Residual_1.SelfAttention.Distribute.Linear_1", False),
    ("attn1.to_k", "Residual_1.SelfAttention.Distribute.Linear_2", False),
    ("attn1.to_v", "Residual_1.SelfAttention.Distribute.Linear_3", False),
    ("attn1.to_out.0", "Residual_1.SelfAttention.Linear", True),
    ("norm2", "Residual_2.LayerNorm", True),
    ("attn2.to_q", "Residual_2.CrossAttention.Attention.Distribute.Linear_1", False),
    ("attn2.to_k", "Residual_2.CrossAttention.Attention.Distribute.Linear_2", False),
    ("attn2.to_v", "Residual_2.CrossAttention.Attention.Distribute.Linear_3", False),
    ("attn2.to_out.0", "Residual_2.CrossAttention.Attention.Linear", True),
    ("norm3", "Residual_3.LayerNorm", True),
    ("ff.net.0.proj", "Residual_3.FeedForward.Linear_1", True),
    ("ff.net.2", "Residual_3.FeedForward.Linear_2", True),
)


@dataclass(frozen=True)
class _Block:
    """One weighted block of the UNet, with its key prefix in each format."""

    kind: Literal["layer", "residual", "attention"]
    diffusers: str
    ldm: str
    ours: str
    shortcut: bool = False
    depth: int = 1


def _blocks(config: UNetConfig) -> Iterator[_Block]:
    channels, layers, attention = config.block_out_channels, config.layers_per_block, config.cross_attention_levels
    levels = len(channels)

    yield _Block("layer", "time_embedding.linear_1", "time_embed.0", "TimestepEncoder.Linear_1")
    yield _Block("layer", "time_embedding.linear_2", "time_embed.2", "TimestepEncoder.Linear_2")
    yield _Block("layer", "conv_in", "input_blocks.0.0", "DownBlocks.Chain_1.Conv2d")

    # Down path: `input_blocks.k` is our `DownBlocks.Chain_<k + 1>`.
    index, previous = 1, channels[0]
    for level in range(levels):
        for layer in range(layers):
            diffusers, ldm, ours = f"down_blocks.{level}", f"input_blocks.{index}", f"DownBlocks.Chain_{index + 1}"
            shortcut = previous != channels[level]
            yield _Block("residual", f"{diffusers}.resnets.{layer}", f"{ldm}.0", f"{ours}.ResidualBlock", shortcut)
            if attention[level]:
                yield _Block(
                    "attention",
                    f"{diffusers}.attentions.{layer}",
                    f"{ldm}.1",
                    f"{ours}.CrossAttentionBlock2d",
                    depth=config.transformer_depth(level),
                )
            index, previous = index + 1, channels[level]
        if level < levels - 1:
            diffusers, ldm = f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"
            yield _Block("layer", diffusers, ldm, f"DownBlocks.Chain_{index + 1}.Downsample.Conv2d")
            index += 1

    yield _Block("residual", "mid_block.resnets.0", "middle_block.0", "MiddleBlock.ResidualBlock_1")
    middle_depth = config.transformer_depth(-1)
    yield _Block(
        "attention", "mid_block.attentions.0", "middle_block.1", "MiddleBlock.CrossAttentionBlock2d", depth=middle_depth
    )
    yield _Block("residual", "mid_block.resnets.1", "middle_block.2", "MiddleBlock.ResidualBlock_2")

    # Up path: `output_blocks.m` is our `UpBlocks.Chain_<m + 1>`; each block takes one skip connection.
    skips = skip_channels(channels, layers)
    index, previous = 0, channels[-1]
    for up_level, level in enumerate(reversed(range(levels))):
        for layer in range(layers + 1):
            diffusers, ldm, ours = f"up_blocks.{up_level}", f"output_blocks.{index}", f"UpBlocks.Chain_{index + 1}"
            shortcut = previous + skips[-1 - index] != channels[level]
            yield _Block("residual", f"{diffusers}.resnets.{layer}", f"{ldm}.0", f"{ours}.ResidualBlock", shortcut)
            if attention[level]:
                yield _Block(
                    "attention",
                    f"{diffusers}.attentions.{layer}",
                    f"{ldm}.1",
                    f"{ours}.CrossAttentionBlock2d",
                    depth=config.transformer_depth(level),
                )
            index, previous = index + 1, channels[level]
        if level > 0:
            upsample = f"output_blocks.{index - 1}.{2 if attention[level] else 1}.conv"
            ours = f"UpBlocks.Chain_{index}.Upsample.Conv2d"
            yield _Block("layer", f"up_blocks.{up_level}.upsamplers.0.conv", upsample, ours)

    yield _Block("layer", "conv_norm_out", "out.0", "OutputBlock.GroupNorm")
    yield _Block("layer", "conv_out", "out.2", "OutputBlock.Conv2d")


def _mapping(config: UNetConfig, layout: Literal["diffusers", "ldm"]) -> dict[str, str]:
    mapping: dict[str, str] = {}

    def add(reference: str, ours: str, bias: bool = True) -> None:
        for suffix in ("weight", "bias") if bias else ("weight",):
            mapping[f"{reference}.{suffix}"] = f"{ours}.{suffix}"

    for block in _blocks(config):
        prefix = block.diffusers if layout == "diffusers" else block.ldm
        if block.kind == "layer":
            add(prefix, block.ours)
        elif block.kind == "residual":
            for diffusers, ldm, ours in RESIDUAL_KEYS + ((SHORTCUT_KEYS,) if block.shortcut else ()):
                add(f"{prefix}.{diffusers if layout == 'diffusers' else ldm}", f"{block.ours}.{ours}")
        else:
            for reference, ours, bias in ATTENTION_KEYS:
                add(f"{prefix}.{reference}", f"{block.ours}.{ours}", bias)
            for index in range(block.depth):
                name = "TransformerBlock" if block.depth == 1 else f"TransformerBlock_{index + 1}"
                for reference, ours, bias in TRANSFORMER_BLOCK_KEYS:
                    add(f"{prefix}.transformer_blocks.{index}.{reference}", f"{block.ours}.Tokens.{name}.{ours}", bias)
    return mapping


def diffusers_unet_mapping(config: UNetConfig = SD15_UNET) -> dict[str, str]:
    """Diffusers `UNet2DConditionModel` state dict key -> `SD1UNet` state dict key, for the UNet `config` describes.

    Its `block_out_channels`, `layers_per_block`, `cross_attention_levels` and `transformer_layers_per_block` shape
    the mapping. An added embedding (SDXL's `add_embedding.*`) is not in it: refiners-sdxl maps those keys.
    """
    return _mapping(config, "diffusers")


def ldm_unet_mapping(config: UNetConfig = SD15_UNET) -> dict[str, str]:
    """Original checkpoint UNet key, without its `model.diffusion_model.` prefix -> `SD1UNet` state dict key.

    E.g. `input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`. `config` as for `diffusers_unet_mapping`.
    """
    return _mapping(config, "ldm")


UNET_FORMAT = ComponentFormat(
    name="unet",
    subfolder="unet",
    weight_stems=("diffusion_pytorch_model",),
    config_class=UNetConfig,
    config_from_diffusers=unet_config_from_diffusers,
    diffusers_mapping=lambda config, file_keys: diffusers_unet_mapping(config),
    single_file_prefix="model.diffusion_model.",
    single_file_mapping=ldm_unet_mapping,
    single_file_config=unet_config_from_ldm,
)
"""How a UNet is stored: diffusers' `unet/` folder, or `model.diffusion_model.*` in an original checkpoint."""
