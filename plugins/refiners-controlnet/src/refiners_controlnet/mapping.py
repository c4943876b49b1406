"""`ControlNetConfig`, read from a diffusers `ControlNetModel` config, and the key mapping of its weights.

The ControlNet's encoder is a copy of the UNet's, with the same layer paths (`TimestepEncoder`, SDXL's
`TextTimeEmbedding`, `DownBlocks`, `MiddleBlock`), so its keys are those of the UNet's mapping (refiners-sd15's, and
refiners-sdxl's for an SDXL ControlNet); the conditioning image encoder and the zero convolutions are mapped here,
with loops over the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

from refiners_core.weights import WeightsError
from refiners_sd15.config_values import check_fields, positive_int, positive_ints
from refiners_sd15.loading import ComponentFormat, config_from_dict
from refiners_sd15.unet import SD15_UNET, UNetConfig, diffusers_unet_mapping, skip_channels, unet_config_from_diffusers

ENCODER_LAYERS = ("TimestepEncoder.", "TextTimeEmbedding.", "DownBlocks.", "MiddleBlock.")
"""Path prefixes of the layers a ControlNet shares with the UNet (and copies from it in `ControlNet.from_unet`)."""

CONDITION_ENCODER = "DownBlocks.Chain_1.ConditionEncoder"
ZERO_CONVOLUTIONS = "ZeroConvolutions"
_UP_BLOCK_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_DEFAULT_DOWN_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]


@dataclass(frozen=True, kw_only=True)
class ControlNetConfig:
    """The shape of a ControlNet: the UNet whose encoder it copies, and its conditioning image encoder.

    `unet` is the config of that UNet (its `out_channels` is not used: a ControlNet has no decoder);
    `conditioning_channels` and `conditioning_embedding_out_channels` are the channels of the conditioning image
    and of its encoder's stages, as in diffusers' `ControlNetModel` config.
    """

    unet: UNetConfig = SD15_UNET
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.unet, UNetConfig):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"unet must be a UNetConfig, got {self.unet!r}")


SD15_CONTROLNET = ControlNetConfig()
"""The ControlNets of Stable Diffusion 1.5 (e.g. lllyasviel/control_v11p_sd15_canny)."""

SDXL_CONTROLNET = ControlNetConfig(
    unet=UNetConfig(
        block_out_channels=(320, 640, 1280),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        cross_attention_levels=(False, True, True),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
)
"""The ControlNets of SDXL base (e.g. diffusers/controlnet-canny-sdxl-1.0): the encoder of SDXL's UNet, with its
`text_time` added embedding. Their smaller variants (`-mid`, `-small`) have fewer transformer blocks."""


def is_sdxl(config: ControlNetConfig) -> bool:
    """Whether the ControlNet copies an SDXL UNet's encoder (with the `text_time` added embedding)."""
    return config.unet.addition_embed_type == "text_time"


def _depths_without_unused_zeros(config: Mapping[str, Any], kinds: list[object]) -> Any:
    """`transformer_layers_per_block` with the zeros of levels without cross-attention (which diffusers ignores, as
    the smaller SDXL ControlNets give them) read as 1; the last entry, the middle block's depth, is kept."""
    depths = config.get("transformer_layers_per_block", 1)
    if not isinstance(depths, list):
        return depths
    values = cast(list[object], depths)  # a JSON list
    if len(values) != len(kinds):
        return values
    last = len(values) - 1
    return [
        1 if value == 0 and level < last and kinds[level] != "CrossAttnDownBlock2D" else value
        for level, value in enumerate(values)
    ]


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> ControlNetConfig:
    """The `ControlNetConfig` of a diffusers `ControlNetModel` config (`config.json`).

    The encoder fields are read as refiners-sd15 reads a UNet config (absent fields take diffusers' defaults), SD1.5
    and SDXL ControlNets (`text_time` added embedding, heads and transformer depths per level) alike; a transformer
    depth of 0 at a level without cross-attention (the smaller SDXL ControlNets) is ignored, as diffusers does.
    Raises ValueError naming the field for an architecture the UNet reader refuses (a middle block without
    transformer blocks included), or a ControlNet variant this package does not implement (`bgr` channel order,
    globally pooled conditions).
    """
    class_name = config.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise ValueError(f"unsupported ControlNet config: _class_name={class_name!r}; expected 'ControlNetModel'")
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(
            f"unsupported ControlNet config: controlnet_conditioning_channel_order={order!r}; expected 'rgb'"
        )
    if config.get("global_pool_conditions", False):
        raise ValueError("unsupported ControlNet config: global_pool_conditions=true; expected false")
    down_block_types: object = config.get("down_block_types", _DEFAULT_DOWN_BLOCKS)
    # The UNet reader checks the encoder fields; a ControlNet has no decoder, so give it the mirror it expects.
    kinds: list[object] = list(down_block_types) if isinstance(down_block_types, list) else []  # pyright: ignore[reportUnknownArgumentType]
    as_unet = {
        **config,
        "_class_name": "UNet2DConditionModel",
        "up_block_types": [_UP_BLOCK_OF.get(kind, kind) if isinstance(kind, str) else kind for kind in reversed(kinds)],
        "transformer_layers_per_block": _depths_without_unused_zeros(config, kinds),
    }
    try:
        unet = unet_config_from_diffusers(as_unet)
    except ValueError as error:
        raise ValueError(f"unsupported ControlNet config: {error}") from error
    return ControlNetConfig(
        unet=unet,
        conditioning_channels=positive_int("conditioning_channels", config.get("conditioning_channels", 3)),
        conditioning_embedding_out_channels=positive_ints(
            "conditioning_embedding_out_channels", config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        ),
    )


def sdxl_module() -> Any:
    """The `refiners_sdxl` package, which an SDXL ControlNet needs (its added embedding and key mapping). Raises
    ImportError saying what to install when it is missing."""
    try:
        import refiners_sdxl
    except ImportError as error:
        raise ImportError(
            "an SDXL ControlNet (addition_embed_type='text_time') needs refiners-sdxl: "
            "pip install 'refiners-controlnet[sdxl]'"
        ) from error
    return refiners_sdxl


def _numbered(name: str, index: int, count: int) -> str:
    """The name a chain gives the `index`-th (0-based) of `count` children of the same class."""
    return name if count == 1 else f"{name}_{index + 1}"


def diffusers_controlnet_mapping(config: ControlNetConfig = SD15_CONTROLNET) -> dict[str, str]:
    """Diffusers `ControlNetModel` state dict key -> `ControlNet` state dict key, for the ControlNet `config`
    describes (its UNet's `block_out_channels`, `layers_per_block`, `cross_attention_levels`, transformer depths and
    its `conditioning_embedding_out_channels` shape the mapping). An SDXL ControlNet's keys are read with
    refiners-sdxl's UNet mapping (the `add_embedding`): raises ImportError if refiners-sdxl is not installed."""
    unet_mapping = diffusers_unet_mapping(config.unet)
    if is_sdxl(config):
        unet_mapping = sdxl_module().diffusers_sdxl_unet_mapping(config.unet)
    mapping = {key: ours for key, ours in unet_mapping.items() if ours.startswith(ENCODER_LAYERS)}

    def add(reference: str, ours: str) -> None:
        for suffix in ("weight", "bias"):
            mapping[f"{reference}.{suffix}"] = f"{ours}.{suffix}"

    embedding_channels = config.conditioning_embedding_out_channels
    add("controlnet_cond_embedding.conv_in", f"{CONDITION_ENCODER}.Conv2d_1")
    blocks = len(embedding_channels) - 1
    for index in range(blocks):
        block = f"{CONDITION_ENCODER}.{_numbered('ConditionBlock', index, blocks)}"
        add(f"controlnet_cond_embedding.blocks.{2 * index}", f"{block}.Conv2d_1")
        add(f"controlnet_cond_embedding.blocks.{2 * index + 1}", f"{block}.Conv2d_2")
    add("controlnet_cond_embedding.conv_out", f"{CONDITION_ENCODER}.Conv2d_2")

    skips = len(skip_channels(config.unet.block_out_channels, config.unet.layers_per_block))
    for index in range(skips):
        add(
            f"controlnet_down_blocks.{index}",
            f"{ZERO_CONVOLUTIONS}.{_numbered('SkipZeroConvolution', index, skips)}.Conv2d",
        )
    add("controlnet_mid_block", f"{ZERO_CONVOLUTIONS}.MiddleZeroConvolution.Conv2d")
    return mapping


def _no_single_file(config: object) -> Any:
    raise WeightsError(
        "original single-file ControlNet checkpoints (`control_model.*` keys) are not supported: use the diffusers "
        "version of the ControlNet (a folder or hub id with config.json and diffusion_pytorch_model.safetensors)"
    )


def _config_to_json(config: ControlNetConfig) -> dict[str, Any]:
    """The UNet's fields but `out_channels`, then the conditioning encoder's: our own format's metadata."""
    unet = {field: value for field, value in asdict(config.unet).items() if field != "out_channels"}
    return {
        **unet,
        "conditioning_channels": config.conditioning_channels,
        "conditioning_embedding_out_channels": config.conditioning_embedding_out_channels,
    }


def _config_from_json(values: dict[str, Any]) -> ControlNetConfig:
    conditioning = ("conditioning_channels", "conditioning_embedding_out_channels")
    unet = config_from_dict(UNetConfig, {key: value for key, value in values.items() if key not in conditioning})
    return config_from_dict(
        ControlNetConfig, {"unet": unet, **{key: values[key] for key in conditioning if key in values}}
    )


CONTROLNET_FORMAT = ComponentFormat(
    name="controlnet",
    subfolder="",
    weight_stems=("diffusion_pytorch_model",),
    config_class=ControlNetConfig,
    config_from_diffusers=controlnet_config_from_diffusers,
    diffusers_mapping=lambda config, file_keys: diffusers_controlnet_mapping(config),
    single_file_prefix="control_model.",
    single_file_mapping=_no_single_file,
    single_file_config=_no_single_file,
    config_to_json=_config_to_json,
    config_from_json=_config_from_json,
)
"""How a ControlNet is stored: a diffusers `ControlNetModel` folder (config.json and its weights at the top)."""
