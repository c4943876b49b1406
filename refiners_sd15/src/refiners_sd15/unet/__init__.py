"""The Stable Diffusion 1.5 UNet, its config, its diffusers config reader and its weight key mappings.

The blocks, the config and the mappings are public so that other UNets of the family (refiners-sdxl) and
adapters (refiners-controlnet) are built from them.
"""

from refiners_sd15.unet.blocks import ConcatenateSkip, CrossAttentionBlock2d, SinusoidalEmbedding, TimestepEncoder
from refiners_sd15.unet.config import (
    SD15_INPAINTING_UNET,
    SD15_UNET,
    UNetConfig,
    skip_channels,
    unet_config_from_diffusers,
    unet_config_from_ldm,
)
from refiners_sd15.unet.layer_blocks import unet_layer_blocks
from refiners_sd15.unet.mapping import UNET_FORMAT, diffusers_unet_mapping, ldm_unet_mapping
from refiners_sd15.unet.unet import DownBlocks, MiddleBlock, OutputBlock, SD1UNet, UpBlocks

__all__ = [
    "SD15_INPAINTING_UNET",
    "SD15_UNET",
    "UNET_FORMAT",
    "ConcatenateSkip",
    "CrossAttentionBlock2d",
    "DownBlocks",
    "MiddleBlock",
    "OutputBlock",
    "SD1UNet",
    "SinusoidalEmbedding",
    "TimestepEncoder",
    "UNetConfig",
    "UpBlocks",
    "diffusers_unet_mapping",
    "ldm_unet_mapping",
    "skip_channels",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
    "unet_layer_blocks",
]
