"""The Stable Diffusion 1.5 UNet, its diffusers config reader and its weight key mappings."""

from refiners_sd15.unet.config import unet_config_from_diffusers, unet_config_from_ldm
from refiners_sd15.unet.mapping import diffusers_unet_mapping, ldm_unet_mapping
from refiners_sd15.unet.unet import SD1UNet

__all__ = [
    "SD1UNet",
    "diffusers_unet_mapping",
    "ldm_unet_mapping",
    "unet_config_from_diffusers",
    "unet_config_from_ldm",
]
