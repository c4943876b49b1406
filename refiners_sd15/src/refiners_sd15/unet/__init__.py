"""The Stable Diffusion 1.5 UNet, its config, its diffusers config reader and its weight key mappings."""

from refiners_sd15.unet.blocks import ConcatenateSkip, TimestepEncoder
from refiners_sd15.unet.config import (
    SD15_INPAINTING_UNET,
    SD15_UNET,
    UNetConfig,
    skip_channels,
    unet_config_from_diffusers,
    unet_config_from_ldm,
)
from refiners_sd15.unet.mapping import diffusers_unet_mapping, ldm_unet_mapping
from refiners_sd15.unet.unet import DownBlocks, MiddleBlock, SD1UNet, UpBlocks

__all__ = [
    "SD15_INPAINTING_UNET",
    "SD15_UNET",
    "ConcatenateSkip",
    "DownBlocks",
    "MiddleBlock",
    "SD1UNet",
    "TimestepEncoder",
    "UNetConfig",
    "UpBlocks",
    "diffusers_unet_mapping",
    "ldm_unet_mapping",
    "skip_channels",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
]
