"""`UNetConfig`, the shape of a UNet, with SD1.5's published values; read from a diffusers `config.json` or from
the tensors of an original checkpoint."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The shape of a Stable Diffusion UNet, in the names and meaning of diffusers' `UNet2DConditionModel` config.

    Except `cross_attention_levels`, which says which resolution levels have cross-attention blocks (diffusers'
    `CrossAttnDownBlock2D` vs `DownBlock2D`; the up path mirrors the down path), and `attention_head_dim` which is,
    as in diffusers' SD1 configs, the number of attention heads. The middle block always has cross-attention.
    Fields are keyword-only, so that a later architecture (SDXL: transformer depth per level, linear projections,
    additional embeddings) can add fields whose defaults keep SD1.5's UNet as it is.

    Raises ValueError when the levels of `cross_attention_levels` and `block_out_channels` differ in number, or
    when `attention_head_dim` does not divide the channels of a level with attention.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    attention_head_dim: int
    cross_attention_dim: int
    cross_attention_levels: tuple[bool, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if len(self.cross_attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"UNetConfig: cross_attention_levels has {len(self.cross_attention_levels)} entries but "
                f"block_out_channels has {len(self.block_out_channels)} levels"
            )
        attended = [c for c, attention in zip(self.block_out_channels, self.cross_attention_levels) if attention]
        for channels in [*attended, self.block_out_channels[-1]]:
            if channels % self.attention_head_dim:
                raise ValueError(
                    f"UNetConfig: {channels} channels cannot be split in attention_head_dim={self.attention_head_dim} "
                    "heads"
                )


SD15_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    cross_attention_dim=768,
    cross_attention_levels=(True, True, True, False),
)
"""The UNet of Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5, `unet/config.json`)."""

SD15_INPAINTING_UNET = replace(SD15_UNET, in_channels=9)
"""The UNet of Stable Diffusion 1.5 inpainting: latents, mask and masked image latents in, 4 + 1 + 4 channels."""

CROSS_ATTENTION_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTENTION_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# Fields whose value must be the SD1 one (diffusers' default when absent): field -> (accepts, what SD1UNet supports).
_FIXED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mid_block_type": (lambda v: v == "UNetMidBlock2DCrossAttn", "'UNetMidBlock2DCrossAttn'"),
    "use_linear_projection": (lambda v: not v, "false (1x1 convolution projections)"),
    "only_cross_attention": (lambda v: not any(v) if isinstance(v, list) else not v, "false"),
    "dual_cross_attention": (lambda v: not v, "false"),
    "class_embed_type": (lambda v: v is None, "null (no class embedding)"),
    "num_class_embeds": (lambda v: v is None, "null (no class embedding)"),
    "addition_embed_type": (lambda v: v is None, "null (no additional embedding)"),
    "encoder_hid_dim": (lambda v: v is None, "null"),
    "encoder_hid_dim_type": (lambda v: v is None, "null"),
    "time_cond_proj_dim": (lambda v: v is None, "null (no guidance embedding)"),
    "time_embedding_type": (lambda v: v == "positional", "'positional'"),
    "time_embedding_act_fn": (lambda v: v is None, "null"),
    "timestep_post_act": (lambda v: v is None, "null"),
    "act_fn": (lambda v: v == "silu", "'silu'"),
    "flip_sin_to_cos": (lambda v: v is True, "true"),
    "freq_shift": (lambda v: v == 0, "0"),
    "center_input_sample": (lambda v: not v, "false"),
    "conv_in_kernel": (lambda v: v == 3, "3"),
    "conv_out_kernel": (lambda v: v == 3, "3"),
    "downsample_padding": (lambda v: v == 1, "1"),
    "mid_block_scale_factor": (lambda v: v == 1, "1"),
    "resnet_time_scale_shift": (lambda v: v == "default", "'default'"),
    "transformer_layers_per_block": (lambda v: all(n == 1 for n in v) if isinstance(v, list) else v == 1, "1"),
    "reverse_transformer_layers_per_block": (lambda v: v is None, "null"),
    "attention_type": (lambda v: v == "default", "'default'"),
    "cross_attention_norm": (lambda v: v is None, "null"),
    "class_embeddings_concat": (lambda v: not v, "false"),
    "num_attention_heads": (lambda v: v is None, "null (SD1 configs give the heads as attention_head_dim)"),
}
_DEFAULTS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "flip_sin_to_cos": True,
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": 1,
    "attention_type": "default",
}


def _unsupported(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"unsupported UNet config: {field}={value!r}; SD1UNet supports {field}={expected}")


def _single(config: Mapping[str, Any], field: str, default: Any) -> Any:
    """A value that diffusers accepts per level as a list: SD1UNet needs the same one for every level."""
    value = config.get(field, default)
    if isinstance(value, list | tuple):
        values: list[Any] = list(value)  # pyright: ignore[reportUnknownArgumentType]
        if not values or any(item != values[0] for item in values):
            raise _unsupported(field, value, "one value for every level")
        return values[0]
    return value


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The `UNetConfig` of a diffusers `UNet2DConditionModel` config (`unet/config.json`).

    Absent fields take diffusers' defaults. Raises ValueError naming the field for an architecture outside the
    SD1 family (linear projections, class or additional embeddings, other block types, per-level heads...).
    """
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise _unsupported("_class_name", class_name, "'UNet2DConditionModel'")
    for field, (accepts, expected) in _FIXED_FIELDS.items():
        value = config.get(field, _DEFAULTS.get(field))
        if not accepts(value):
            raise _unsupported(field, value, expected)

    block_out_channels = [int(channels) for channels in config.get("block_out_channels", (320, 640, 1280, 1280))]
    down_block_types = list(config.get("down_block_types", [CROSS_ATTENTION_DOWN] * 3 + [PLAIN_DOWN]))
    up_block_types = list(config.get("up_block_types", [PLAIN_UP] + [CROSS_ATTENTION_UP] * 3))
    if len(down_block_types) != len(block_out_channels) or any(
        kind not in (CROSS_ATTENTION_DOWN, PLAIN_DOWN) for kind in down_block_types
    ):
        expected = (
            f"{len(block_out_channels)} of '{CROSS_ATTENTION_DOWN}' or '{PLAIN_DOWN}' (one per block_out_channels)"
        )
        raise _unsupported("down_block_types", down_block_types, expected)
    cross_attention_levels = [kind == CROSS_ATTENTION_DOWN for kind in down_block_types]
    mirrored = [CROSS_ATTENTION_UP if attention else PLAIN_UP for attention in reversed(cross_attention_levels)]
    if up_block_types != mirrored:
        raise _unsupported("up_block_types", up_block_types, f"{mirrored} (the mirror of down_block_types)")
    embedding_dim = config.get("time_embedding_dim")
    if embedding_dim is not None and embedding_dim != 4 * block_out_channels[0]:
        raise _unsupported("time_embedding_dim", embedding_dim, f"null or {4 * block_out_channels[0]}")

    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=int(_single(config, "layers_per_block", 2)),
        attention_head_dim=int(_single(config, "attention_head_dim", 8)),
        cross_attention_dim=int(_single(config, "cross_attention_dim", 1280)),
        cross_attention_levels=tuple(cross_attention_levels),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
    )


def unet_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The `UNetConfig` read from the shapes of an original checkpoint's UNet tensors.

    Keys are without the `model.diffusion_model.` prefix. The number of attention heads and of normalisation
    groups are not stored in the weights: they are SD1's (8 and 32). Raises ValueError naming the key for an
    architecture outside the SD1 family.
    """
    for key, tensor in tensors.items():
        if key.startswith("label_emb."):
            raise ValueError(f"unsupported UNet checkpoint: '{key}' is a class/additional embedding (SDXL-like)")
        if key.endswith(".proj_in.weight") and tensor.dim() == 2:
            raise ValueError(
                f"unsupported UNet checkpoint: '{key}' is a linear projection (SD2-like), SD1UNet uses 1x1 convolutions"
            )
    if "input_blocks.0.0.weight" not in tensors or "out.2.weight" not in tensors:
        raise ValueError("not a UNet checkpoint: no 'input_blocks.0.0.weight' or 'out.2.weight'")
    conv_in, conv_out = tensors["input_blocks.0.0.weight"], tensors["out.2.weight"]

    blocks = sorted({int(match.group(1)) for key in tensors if (match := re.match(r"input_blocks\.(\d+)\.", key))})
    downsamples = [index for index in blocks if f"input_blocks.{index}.0.op.weight" in tensors]
    layers_per_block = (downsamples[0] if downsamples else len(blocks)) - 1
    block_out_channels: list[int] = []
    cross_attention_levels: list[bool] = []
    for level in range(len(downsamples) + 1):
        first = 1 + level * (layers_per_block + 1)
        block_out_channels.append(tensors[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        cross_attention_levels.append(f"input_blocks.{first}.1.proj_in.weight" in tensors)
    keys = [key for key in tensors if key.endswith(".attn2.to_k.weight")]
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=conv_out.shape[0],
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=8,
        cross_attention_dim=tensors[keys[0]].shape[1] if keys else 768,
        cross_attention_levels=tuple(cross_attention_levels),
        norm_num_groups=32,
        norm_eps=1e-5,
    )


def skip_channels(block_out_channels: Sequence[int], layers_per_block: int) -> list[int]:
    """Channels of the skip connections `skip_0, skip_1...`, in the order the down path stores them.

    The input convolution, then for each level its residual blocks and (except the last level) its downsample.
    """
    channels = [block_out_channels[0]]
    for level, level_channels in enumerate(block_out_channels):
        downsamples = level < len(block_out_channels) - 1
        channels += [level_channels] * (layers_per_block + downsamples)
    return channels
