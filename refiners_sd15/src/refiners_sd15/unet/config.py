"""`UNetConfig`, the shape of a UNet, with SD1.5's published values; read from a diffusers `config.json` or from
the tensors of an original checkpoint."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch

from refiners_core.state_dicts import shape_of
from refiners_sd15.config_values import check_fields, flag, is_list, positive_int, positive_ints, positive_number


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The shape of a Stable Diffusion UNet, in the names and meaning of diffusers' `UNet2DConditionModel` config.

    Except `cross_attention_levels`, which says which resolution levels have cross-attention blocks (diffusers'
    `CrossAttnDownBlock2D` vs `DownBlock2D`; the up path mirrors the down path), and `attention_head_dim` which is,
    as in diffusers' SD1, SD2 and SDXL configs, the number of attention heads: one for every level, or one per level.
    The middle block always has cross-attention, with the last level's heads and transformer depth.

    The fields after `norm_eps` describe later architectures; their defaults keep SD1.5's UNet as it is:
    `transformer_layers_per_block` (the number of transformer blocks in each spatial transformer, for every level or
    per level), `use_linear_projection` (the reference's transformer projections are linear layers rather than 1x1
    convolutions: the same computation, weights of another shape), and SDXL's `text_time` added embedding
    (`addition_embed_type`: sinusoids of `addition_time_embed_dim` features for each time id, concatenated with the
    pooled text embedding into `projection_class_embeddings_input_dim` features).

    Raises ValueError naming the field when a size is not a positive integer (`norm_eps`: a positive number), when
    a per-level field or `cross_attention_levels` has another number of levels than
    `block_out_channels`, when the heads do not divide the channels of a level with attention, or when the added
    embedding's fields are inconsistent.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...]
    cross_attention_dim: int
    cross_attention_levels: tuple[bool, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        for field in ("attention_head_dim", "transformer_layers_per_block"):
            value = getattr(self, field)
            checked = positive_int(field, value) if isinstance(value, int) else positive_ints(field, value)
            object.__setattr__(self, field, checked)
        levels = len(self.block_out_channels)
        for field, value in (
            ("cross_attention_levels", self.cross_attention_levels),
            ("attention_head_dim", self.attention_head_dim),
            ("transformer_layers_per_block", self.transformer_layers_per_block),
        ):
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(
                    f"UNetConfig: {field} has {len(value)} entries but block_out_channels has {levels} levels"
                )
        attended = [level for level, attention in enumerate(self.cross_attention_levels) if attention]
        for level in [*attended, levels - 1]:
            channels, heads = self.block_out_channels[level], self.num_heads(level)
            if channels % heads:
                raise ValueError(
                    f"UNetConfig: {channels} channels of level {level} cannot be split in {heads} attention heads "
                    f"(attention_head_dim={self.attention_head_dim})"
                )
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNetConfig: addition_embed_type={self.addition_embed_type!r}; expected None or 'text_time'"
            )
        added = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if (None in added) if self.addition_embed_type else (added != (None, None)):
            raise ValueError(
                "UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim, and without an added embedding both are None; got "
                f"addition_embed_type={self.addition_embed_type!r}, addition_time_embed_dim={added[0]}, "
                f"projection_class_embeddings_input_dim={added[1]}"
            )

    def num_heads(self, level: int) -> int:
        """The number of attention heads of the spatial transformers of `level` (-1: the last level and the middle
        block)."""
        heads = self.attention_head_dim
        return heads if isinstance(heads, int) else heads[level]

    def transformer_depth(self, level: int) -> int:
        """The number of transformer blocks in each spatial transformer of `level` (-1: the last level and the middle
        block)."""
        depth = self.transformer_layers_per_block
        return depth if isinstance(depth, int) else depth[level]


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

# Fields whose value must be the SD one (diffusers' default when absent): field -> (accepts, what is supported).
_FIXED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "mid_block_type": (lambda v: v == "UNetMidBlock2DCrossAttn", "'UNetMidBlock2DCrossAttn'"),
    "only_cross_attention": (lambda v: not any(cast(list[object], v)) if isinstance(v, list) else not v, "false"),
    "dual_cross_attention": (lambda v: not v, "false"),
    "addition_embed_type": (lambda v: v in (None, "text_time"), "null or 'text_time' (SDXL's added embedding)"),
    "class_embed_type": (lambda v: v is None, "null (no class embedding)"),
    "num_class_embeds": (lambda v: v is None, "null (no class embedding)"),
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
    "reverse_transformer_layers_per_block": (lambda v: v is None, "null"),
    "attention_type": (lambda v: v == "default", "'default'"),
    "cross_attention_norm": (lambda v: v is None, "null"),
    "class_embeddings_concat": (lambda v: not v, "false"),
    "num_attention_heads": (lambda v: v is None, "null (SD configs give the heads as attention_head_dim)"),
}
_DEFAULTS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
}


def _unsupported(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"unsupported UNet config: {field}={value!r}; expected {field}={expected}")


def _single(config: Mapping[str, Any], field: str, default: Any) -> Any:
    """A value that diffusers accepts per level as a list, where the UNet needs the same one for every level."""
    value = config.get(field, default)
    if is_list(value):
        values = list(value)
        if not values or any(item != values[0] for item in values):
            raise _unsupported(field, value, "one value for every level")
        return values[0]
    return value


def _per_level(config: Mapping[str, Any], field: str, default: int, levels: int) -> int | tuple[int, ...]:
    """A positive integer for every level, or a list of one per level: the same value everywhere reads as one int."""
    value = config.get(field, default)
    values = positive_ints(field, value) if is_list(value) else (positive_int(field, value),)
    if len(values) not in (1, levels):
        raise _unsupported(field, value, f"a positive integer or a list of {levels} (one per level)")
    return values[0] if all(item == values[0] for item in values) else values


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The `UNetConfig` of a diffusers `UNet2DConditionModel` config (`unet/config.json`).

    Absent fields take diffusers' defaults. SD1, SD2 and SDXL configs are read (heads and transformer depths per
    level, linear projections, SDXL's `text_time` added embedding). Raises ValueError naming the field for an
    architecture outside that family (class embeddings, other added embeddings, other block types...).
    """
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise _unsupported("_class_name", class_name, "'UNet2DConditionModel'")
    for field, (accepts, expected) in _FIXED_FIELDS.items():
        value = config.get(field, _DEFAULTS.get(field))
        if not accepts(value):
            raise _unsupported(field, value, expected)

    block_out_channels = positive_ints("block_out_channels", config.get("block_out_channels", (320, 640, 1280, 1280)))
    down_block_types = config.get("down_block_types", [CROSS_ATTENTION_DOWN] * 3 + [PLAIN_DOWN])
    up_block_types = config.get("up_block_types", [PLAIN_UP] + [CROSS_ATTENTION_UP] * 3)
    kinds = cast(list[object], down_block_types) if isinstance(down_block_types, list) else None  # a JSON list
    if (
        kinds is None
        or len(kinds) != len(block_out_channels)
        or any(kind not in (CROSS_ATTENTION_DOWN, PLAIN_DOWN) for kind in kinds)
    ):
        expected = (
            f"{len(block_out_channels)} of '{CROSS_ATTENTION_DOWN}' or '{PLAIN_DOWN}' (one per block_out_channels)"
        )
        raise _unsupported("down_block_types", down_block_types, expected)
    cross_attention_levels = [kind == CROSS_ATTENTION_DOWN for kind in kinds]
    mirrored = [CROSS_ATTENTION_UP if attention else PLAIN_UP for attention in reversed(cross_attention_levels)]
    if up_block_types != mirrored:  # a list equal to it, nothing else
        raise _unsupported("up_block_types", up_block_types, f"{mirrored} (the mirror of down_block_types)")
    embedding_dim = config.get("time_embedding_dim")
    if embedding_dim is not None and embedding_dim != 4 * block_out_channels[0]:
        raise _unsupported("time_embedding_dim", embedding_dim, f"null or {4 * block_out_channels[0]}")

    addition_embed_type = config.get("addition_embed_type")
    added: dict[str, int | None] = {"addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None}
    if addition_embed_type is not None:
        for field in added:
            value = config.get(field)
            if not isinstance(value, int) or value <= 0:
                raise _unsupported(field, value, "a positive integer (addition_embed_type='text_time' needs it)")
            added[field] = value

    levels = len(block_out_channels)
    return UNetConfig(
        in_channels=positive_int("in_channels", config.get("in_channels", 4)),
        out_channels=positive_int("out_channels", config.get("out_channels", 4)),
        block_out_channels=block_out_channels,
        layers_per_block=positive_int("layers_per_block", _single(config, "layers_per_block", 2)),
        attention_head_dim=_per_level(config, "attention_head_dim", 8, levels),
        cross_attention_dim=positive_int("cross_attention_dim", _single(config, "cross_attention_dim", 1280)),
        cross_attention_levels=tuple(cross_attention_levels),
        norm_num_groups=positive_int("norm_num_groups", config.get("norm_num_groups", 32)),
        norm_eps=positive_number("norm_eps", config.get("norm_eps", 1e-5)),
        transformer_layers_per_block=_per_level(config, "transformer_layers_per_block", 1, levels),
        use_linear_projection=flag("use_linear_projection", config.get("use_linear_projection", False)),
        addition_embed_type=addition_embed_type,
        **added,
    )


def unet_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The `UNetConfig` read from the shapes of an original checkpoint's UNet tensors.

    Keys are without the `model.diffusion_model.` prefix. What the weights do not store is taken from the published
    models of the family, as diffusers' converter does: 32 normalisation groups; 8 heads with 1x1 convolution
    projections (SD1), 64 channels per head with linear ones (SD2, SDXL); SDXL's 256 features per time id for an
    added embedding (`label_emb.0.*`). Transformer depths are counted. Raises ValueError naming the key for an
    architecture outside that family, and the key a size is read from when it is missing or of the wrong shape.
    """
    if "input_blocks.0.0.weight" not in tensors or "out.2.weight" not in tensors:
        raise ValueError("not a UNet checkpoint: no 'input_blocks.0.0.weight' or 'out.2.weight'")
    in_channels = shape_of(tensors, "input_blocks.0.0.weight", 4, "in_channels")[1]
    out_channels = shape_of(tensors, "out.2.weight", 4, "out_channels")[0]
    keys = [key for key in tensors if key.endswith(".attn2.to_k.weight")]
    cross_attention_dim = shape_of(tensors, keys[0], 2, "cross_attention_dim")[1] if keys else 768
    # SDXL's added embedding is an MLP (`label_emb.0.0`, `label_emb.0.2`) in a UNet without attention on its first
    # level; other `label_emb` (SD2's upscaler, unCLIP) are class embeddings.
    added = tensors.get("label_emb.0.0.weight")
    if added is not None and "input_blocks.1.1.proj_in.weight" in tensors:
        added = None
    for key in tensors:
        if key.startswith("label_emb.") and added is None:
            raise ValueError(
                f"unsupported UNet checkpoint: '{key}' is a class embedding; only SDXL's added embedding "
                "('label_emb.0.*', in a UNet without attention on its first level) is supported"
            )
    linear = [key for key in tensors if key.endswith(".proj_in.weight") and tensors[key].dim() == 2]

    def depth(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
        return 1 + max((int(match.group(1)) for key in tensors if (match := pattern.match(key))), default=0)

    blocks = sorted({int(match.group(1)) for key in tensors if (match := re.match(r"input_blocks\.(\d+)\.", key))})
    downsamples = [index for index in blocks if f"input_blocks.{index}.0.op.weight" in tensors]
    layers_per_block = (downsamples[0] if downsamples else len(blocks)) - 1
    if layers_per_block < 1:
        raise ValueError(
            f"the 'input_blocks.N' keys ({len(blocks)} blocks, downsampling at {downsamples}) give no residual block "
            "before the first downsample, so no layers_per_block"
        )
    block_out_channels: list[int] = []
    cross_attention_levels: list[bool] = []
    depths: list[int] = []
    for level in range(len(downsamples) + 1):
        first = 1 + level * (layers_per_block + 1)
        key = f"input_blocks.{first}.0.out_layers.3.weight"
        block_out_channels.append(shape_of(tensors, key, 4, f"block_out_channels[{level}]")[0])
        cross_attention_levels.append(f"input_blocks.{first}.1.proj_in.weight" in tensors)
        depths.append(depth(f"input_blocks.{first}.1") if cross_attention_levels[-1] else 1)
    depths[-1] = depth("middle_block.1")  # the middle block's, which the last level gives
    attended = [d for d, attention in zip(depths, cross_attention_levels) if attention] + [depths[-1]]
    heads = [max(1, channels // 64) for channels in block_out_channels] if linear else [8]
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),
        cross_attention_dim=cross_attention_dim,
        cross_attention_levels=tuple(cross_attention_levels),
        norm_num_groups=32,
        norm_eps=1e-5,
        transformer_layers_per_block=attended[0] if len(set(attended)) == 1 else tuple(depths),
        use_linear_projection=bool(linear),
        addition_embed_type="text_time" if added is not None else None,
        addition_time_embed_dim=256 if added is not None else None,
        projection_class_embeddings_input_dim=added.shape[1] if added is not None else None,
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
