"""The references of the parity tests: diffusers' `ControlNetModel` and `UNet2DConditionModel`, built offline from
published configs with random weights, and how to run them and compare with ours."""

from __future__ import annotations

from typing import Any, cast

import torch
from diffusers import ControlNetModel, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

from refiners_controlnet import ControlNet
from refiners_sd15.testing import SD15_UNET_CONFIG
from refiners_sd15.unet import SD1UNet
from refiners_sdxl.testing import SDXL_BASE_UNET_CONFIG, SMALL_UNET

# lllyasviel/control_v11p_sd15_canny, config.json (the ControlNet 1.1 models all share it)
SD15_CONTROLNET_CONFIG: dict[str, Any] = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.16.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}

# A small SD1-like UNet: three levels, cross-attention on the first two, as in SD1.5.
SMALL_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# The ControlNet of that UNet; its conditioning image encoder also downsamples 8 times, with fewer channels.
SMALL_CONTROLNET_CONFIG: dict[str, Any] = {
    **SD15_CONTROLNET_CONFIG,
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64],
    "conditioning_embedding_out_channels": [8, 16, 16, 32],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
}

_UNET_ONLY = ("sample_size", "up_block_types", "out_channels")

SMALL_SDXL_CONTROLNET: dict[str, Any] = {
    **{key: value for key, value in SMALL_UNET.items() if key not in _UNET_ONLY},
    "conditioning_embedding_out_channels": [8, 16, 16, 32],
}
"""The ControlNet of `SMALL_UNET`: a copy of its encoder, with a small conditioning image encoder (8x down)."""
SMALL_SDXL_CONTROLNET_MID: dict[str, Any] = {**SMALL_SDXL_CONTROLNET, "transformer_layers_per_block": [0, 1]}
"""As diffusers/controlnet-canny-sdxl-1.0-mid: fewer transformer blocks, 0 where a level has no attention."""
SMALL_SDXL_CONTROLNET_SMALL: dict[str, Any] = {
    **SMALL_SDXL_CONTROLNET_MID,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
}
"""As diffusers/controlnet-canny-sdxl-1.0-small: no attention in the down blocks, only in the middle block."""

# diffusers/controlnet-canny-sdxl-1.0, config.json (the fields that shape the network)
SDXL_CONTROLNET_CONFIG: dict[str, Any] = {
    **{key: value for key, value in SDXL_BASE_UNET_CONFIG.items() if key not in _UNET_ONLY},
    "_class_name": "ControlNetModel",
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False,
}
# The -mid and -small variants share these fields but for fewer transformer blocks. -small's published config has
# three `DownBlock2D` (no attention but in the middle block); its transformer_layers_per_block (and -mid's config) could
# not be read from the stored copies: these depths, with 0 at levels without attention, fit their published sizes
# (about 0.2 B and 0.3 B parameters) and exercise the same reading.
SDXL_CONTROLNET_MID_CONFIG: dict[str, Any] = {**SDXL_CONTROLNET_CONFIG, "transformer_layers_per_block": [0, 1, 1]}
SDXL_CONTROLNET_SMALL_CONFIG: dict[str, Any] = {
    **SDXL_CONTROLNET_CONFIG,
    "down_block_types": ["DownBlock2D"] * 3,
    "transformer_layers_per_block": [0, 0, 1],
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter at random, independently (the zero convolutions too, so residuals are not zero).

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1): no zero or constant initialisation is
    left to hide a missing or swapped key, and activations keep their scale through the network.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                std, mean = parameter[0].numel() ** -0.5, 0.0
            else:
                std, mean = 0.1, 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std + mean)


def reference_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    with torch.device("meta"):
        unet = cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config))  # pyright: ignore[reportUnknownMemberType]
    unet = unet.to_empty(device="cpu").eval()
    randomize(unet, seed)
    return unet


def reference_controlnet(config: dict[str, Any], seed: int = 1) -> ControlNetModel:
    with torch.device("meta"):
        controlnet = cast(ControlNetModel, ControlNetModel.from_config(config))  # pyright: ignore[reportUnknownMemberType]
    controlnet = controlnet.to_empty(device="cpu").eval()
    randomize(controlnet, seed)
    return controlnet


@torch.no_grad()
def reference_residuals(
    controlnet: ControlNetModel,
    x: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    condition: torch.Tensor,
    scale: float = 1.0,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """diffusers' ControlNet residuals: those of the skip connections, and the middle block's."""
    down, middle = controlnet(  # pyright: ignore[reportUnknownVariableType]
        x, timestep, encoder_hidden_states=text, controlnet_cond=condition, conditioning_scale=scale, return_dict=False
    )
    return list(down), middle  # pyright: ignore[reportUnknownArgumentType]


@torch.no_grad()
def reference_unet_output(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    down, middle = residuals if residuals is not None else (None, None)
    return unet(  # pyright: ignore[reportUnknownMemberType]
        x,
        timestep,
        encoder_hidden_states=text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=middle,
    ).sample


@torch.no_grad()
def our_residuals(
    controlnet: ControlNet, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, condition: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    controlnet.set_context("diffusion", {"timestep": timestep, "clip_text_embedding": text})
    controlnet.set_condition(condition)
    assert controlnet(x) is x  # a Passthrough: the latents go on to the UNet unchanged
    return controlnet.residuals


@torch.no_grad()
def our_unet_output(unet: SD1UNet, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    return unet(x)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    """max |ours - reference| <= tolerance * max |reference|."""
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert scale > 0
    assert error <= tolerance * scale, f"max |ours - reference| = {error:.3g} > {tolerance} * {scale:.3g}"


def assert_residuals_close(
    ours: tuple[torch.Tensor, ...], reference: tuple[list[torch.Tensor], torch.Tensor], tolerance: float = 1e-4
) -> None:
    down, middle = reference
    assert len(ours) == len(down) + 1
    for mine, theirs in zip(ours, [*down, middle]):
        assert theirs.abs().max() > 0, "a reference residual is zero: the test would not see a wrong zero convolution"
        assert_close(mine, theirs, tolerance)
