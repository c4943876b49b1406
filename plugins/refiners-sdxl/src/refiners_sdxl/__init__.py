"""Stable Diffusion XL for refiners: `StableDiffusion_XL` (base), `StableDiffusion_XL_Inpainting`,
`StableDiffusion_XL_Refiner` and their SDXL UNet, built from refiners-sd15's blocks, text encoders, autoencoder and
solvers.

from refiners_sdxl import StableDiffusion_XL

sdxl = StableDiffusion_XL.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_sd15.solvers import denoising_end_step as refiner_first_step
    from refiners_sdxl.config import SDXL_AUTOENCODER, SDXL_BASE_UNET, SDXL_INPAINTING_UNET, SDXL_REFINER_UNET
    from refiners_sdxl.denoising import SDXLDenoisingModel
    from refiners_sdxl.folder import (
        SDXLFolder,
        SDXLRefinerFolder,
        check_sdxl_components,
        check_sdxl_refiner_components,
        read_sdxl_folder,
        read_sdxl_refiner_folder,
    )
    from refiners_sdxl.inpainting import StableDiffusion_XL_Inpainting
    from refiners_sdxl.model import StableDiffusion_XL
    from refiners_sdxl.refiner import StableDiffusion_XL_Refiner
    from refiners_sdxl.single_file import (
        SDXL_AUTOENCODER_FORMAT,
        SDXL_REFINER_TEXT_ENCODER_FORMAT,
        check_sdxl_base_checkpoint,
        check_sdxl_refiner_checkpoint,
        load_sdxl_refiner_single_file,
        load_sdxl_single_file,
        read_sdxl_refiner_single_file,
        read_sdxl_single_file,
    )
    from refiners_sdxl.unet import (
        SDXL_UNET_FORMAT,
        SDXLUNet,
        TextTimeEmbedding,
        TimeIdsEmbedding,
        diffusers_sdxl_unet_mapping,
        ldm_sdxl_unet_mapping,
    )


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "refiner_first_step": "refiners_sd15.solvers:denoising_end_step",
        "SDXL_AUTOENCODER": "refiners_sdxl.config",
        "SDXL_BASE_UNET": "refiners_sdxl.config",
        "SDXL_INPAINTING_UNET": "refiners_sdxl.config",
        "SDXL_REFINER_UNET": "refiners_sdxl.config",
        "SDXLDenoisingModel": "refiners_sdxl.denoising",
        "SDXLFolder": "refiners_sdxl.folder",
        "SDXLRefinerFolder": "refiners_sdxl.folder",
        "check_sdxl_components": "refiners_sdxl.folder",
        "check_sdxl_refiner_components": "refiners_sdxl.folder",
        "read_sdxl_folder": "refiners_sdxl.folder",
        "read_sdxl_refiner_folder": "refiners_sdxl.folder",
        "StableDiffusion_XL_Inpainting": "refiners_sdxl.inpainting",
        "StableDiffusion_XL": "refiners_sdxl.model",
        "StableDiffusion_XL_Refiner": "refiners_sdxl.refiner",
        "SDXL_AUTOENCODER_FORMAT": "refiners_sdxl.single_file",
        "SDXL_REFINER_TEXT_ENCODER_FORMAT": "refiners_sdxl.single_file",
        "check_sdxl_base_checkpoint": "refiners_sdxl.single_file",
        "check_sdxl_refiner_checkpoint": "refiners_sdxl.single_file",
        "load_sdxl_refiner_single_file": "refiners_sdxl.single_file",
        "load_sdxl_single_file": "refiners_sdxl.single_file",
        "read_sdxl_refiner_single_file": "refiners_sdxl.single_file",
        "read_sdxl_single_file": "refiners_sdxl.single_file",
        "SDXL_UNET_FORMAT": "refiners_sdxl.unet",
        "SDXLUNet": "refiners_sdxl.unet",
        "TextTimeEmbedding": "refiners_sdxl.unet",
        "TimeIdsEmbedding": "refiners_sdxl.unet",
        "diffusers_sdxl_unet_mapping": "refiners_sdxl.unet",
        "ldm_sdxl_unet_mapping": "refiners_sdxl.unet",
    },
)

__all__ = [
    "SDXL_AUTOENCODER",
    "SDXL_AUTOENCODER_FORMAT",
    "SDXL_BASE_UNET",
    "SDXL_INPAINTING_UNET",
    "SDXL_REFINER_TEXT_ENCODER_FORMAT",
    "SDXL_REFINER_UNET",
    "SDXL_UNET_FORMAT",
    "SDXLDenoisingModel",
    "SDXLFolder",
    "SDXLRefinerFolder",
    "SDXLUNet",
    "StableDiffusion_XL",
    "StableDiffusion_XL_Inpainting",
    "StableDiffusion_XL_Refiner",
    "TextTimeEmbedding",
    "TimeIdsEmbedding",
    "check_sdxl_base_checkpoint",
    "check_sdxl_components",
    "check_sdxl_refiner_checkpoint",
    "check_sdxl_refiner_components",
    "diffusers_sdxl_unet_mapping",
    "ldm_sdxl_unet_mapping",
    "load_sdxl_refiner_single_file",
    "load_sdxl_single_file",
    "read_sdxl_folder",
    "read_sdxl_refiner_folder",
    "read_sdxl_refiner_single_file",
    "read_sdxl_single_file",
    "refiner_first_step",
]
