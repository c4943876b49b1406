"""Stable Diffusion XL for refiners: the SDXL UNet (base, refiner, inpainting), built from refiners-sd15's blocks."""

from refiners_sdxl.config import SDXL_BASE_UNET, SDXL_INPAINTING_UNET, SDXL_REFINER_UNET
from refiners_sdxl.unet import (
    SDXL_UNET_FORMAT,
    SDXLUNet,
    TextTimeEmbedding,
    TimeIdsEmbedding,
    diffusers_sdxl_unet_mapping,
    ldm_sdxl_unet_mapping,
)

__all__ = [
    "SDXL_BASE_UNET",
    "SDXL_INPAINTING_UNET",
    "SDXL_REFINER_UNET",
    "SDXL_UNET_FORMAT",
    "SDXLUNet",
    "TextTimeEmbedding",
    "TimeIdsEmbedding",
    "diffusers_sdxl_unet_mapping",
    "ldm_sdxl_unet_mapping",
]
