"""Helpers for tests of refiners-controlnet and of the packages built on it: the references of the parity tests,
diffusers' `ControlNetModel` and `UNet2DConditionModel` built offline from published configs with random weights, and
how to run them and compare with ours. Needs diffusers and refiners-sdxl (test extras); nothing here is used at
runtime."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

from refiners_controlnet import ControlNet
from refiners_core.testing import assert_relative_close
from refiners_sd15.testing import SD15_UNET_CONFIG
from refiners_sd15.unet import SD1UNet
from refiners_sdxl.testing import SDXL_BASE_UNET_CONFIG, SMALL_UNET, random_diffusers_model

_UNET_ONLY = ("sample_size", "up_block_types", "out_channels")

# lllyasviel/control_v11p_sd15_canny, config.json (the ControlNet 1.1 models all share it): SD1.5's UNet config
# without its decoder and output fields, with those of the ControlNet.
SD15_CONTROLNET_CONFIG: dict[str, Any] = {
    **{key: value for key, value in SD15_UNET_CONFIG.items() if key not in (*_UNET_ONLY, "center_input_sample")},
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.16.0.dev0",
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
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


def reference_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """diffusers' `UNet2DConditionModel` of `config`, every parameter drawn by `refiners_sdxl.testing.randomize`."""
    return random_diffusers_model(UNet2DConditionModel, config, seed)


def reference_controlnet(config: dict[str, Any], seed: int = 1) -> ControlNetModel:
    """diffusers' `ControlNetModel` of `config`, every parameter drawn by `refiners_sdxl.testing.randomize` (the zero
    convolutions too, so that residuals are not zero)."""
    return random_diffusers_model(ControlNetModel, config, seed)


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


def assert_residuals_close(
    ours: tuple[torch.Tensor, ...], reference: tuple[list[torch.Tensor], torch.Tensor], tolerance: float = 1e-4
) -> None:
    """Our residuals against diffusers', each within `tolerance` of its max |reference| and none of those zero."""
    down, middle = reference
    assert len(ours) == len(down) + 1
    for mine, theirs in zip(ours, [*down, middle]):
        assert theirs.abs().max() > 0, "a reference residual is zero: the test would not see a wrong zero convolution"
        assert_relative_close(mine, theirs, tolerance)
