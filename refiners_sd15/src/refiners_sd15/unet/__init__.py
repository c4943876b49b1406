"""The Stable Diffusion 1.5 UNet, its diffusers config reader and its weight key mappings."""

from refiners_sd15.unet.blocks import ConcatenateSkip, TimestepEncoder
from refiners_sd15.unet.config import skip_channels, unet_config_from_diffusers, unet_config_from_ldm
from refiners_sd15.unet.mapping import diffusers_unet_mapping, ldm_unet_mapping
from refiners_sd15.unet.unet import DownBlocks, MiddleBlock, SD1UNet, UpBlocks

__all__ = [
    "ConcatenateSkip",
    "DownBlocks",
    "MiddleBlock",
    "SD1UNet",
    "TimestepEncoder",
    "UpBlocks",
    "diffusers_unet_mapping",
    "ldm_unet_mapping",
    "skip_channels",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
]
