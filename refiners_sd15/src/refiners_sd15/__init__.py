"""Stable Diffusion 1.5 for refiners: CLIP text encoder and tokenizer, UNet, autoencoder, solvers and pipelines.

from refiners_sd15 import StableDiffusion_1

sd = StableDiffusion_1.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_sd15.autoencoder import SD15_AUTOENCODER, AutoencoderConfig, SD1Autoencoder
    from refiners_sd15.clip import (
        CLIP_TEXT_G,
        CLIP_TEXT_L,
        CLIP_TEXT_L_PENULTIMATE,
        CLIPTextEncoderConfig,
        CLIPTextEncoderG,
        CLIPTextEncoderL,
        CLIPTokenizer,
        DoubleTextEncoder,
    )
    from refiners_sd15.inpainting import (
        StableDiffusion_1_Inpainting,
        compute_inpainting_conditions,
        concatenate_inpainting_conditions,
    )
    from refiners_sd15.latent_diffusion import (
        MAX_IMAGE_PIXELS,
        MAX_IMAGE_SIDE,
        MAX_SEED,
        LatentDiffusionModel,
        check_image_size,
        check_input_image,
        guidance_prompts,
    )
    from refiners_sd15.model import StableDiffusion_1
    from refiners_sd15.solvers import DDIM, DPMSolver, Euler, Solver
    from refiners_sd15.unet import SD15_INPAINTING_UNET, SD15_UNET, SD1UNet, UNetConfig


try:
    __version__ = version("refiners-sd15")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SD15_AUTOENCODER": "refiners_sd15.autoencoder",
        "AutoencoderConfig": "refiners_sd15.autoencoder",
        "SD1Autoencoder": "refiners_sd15.autoencoder",
        "CLIP_TEXT_G": "refiners_sd15.clip",
        "CLIP_TEXT_L": "refiners_sd15.clip",
        "CLIP_TEXT_L_PENULTIMATE": "refiners_sd15.clip",
        "CLIPTextEncoderConfig": "refiners_sd15.clip",
        "CLIPTextEncoderG": "refiners_sd15.clip",
        "CLIPTextEncoderL": "refiners_sd15.clip",
        "CLIPTokenizer": "refiners_sd15.clip",
        "DoubleTextEncoder": "refiners_sd15.clip",
        "StableDiffusion_1_Inpainting": "refiners_sd15.inpainting",
        "compute_inpainting_conditions": "refiners_sd15.inpainting",
        "concatenate_inpainting_conditions": "refiners_sd15.inpainting",
        "MAX_IMAGE_PIXELS": "refiners_sd15.latent_diffusion",
        "MAX_IMAGE_SIDE": "refiners_sd15.latent_diffusion",
        "MAX_SEED": "refiners_sd15.latent_diffusion",
        "LatentDiffusionModel": "refiners_sd15.latent_diffusion",
        "check_image_size": "refiners_sd15.latent_diffusion",
        "check_input_image": "refiners_sd15.latent_diffusion",
        "guidance_prompts": "refiners_sd15.latent_diffusion",
        "StableDiffusion_1": "refiners_sd15.model",
        "DDIM": "refiners_sd15.solvers",
        "DPMSolver": "refiners_sd15.solvers",
        "Euler": "refiners_sd15.solvers",
        "Solver": "refiners_sd15.solvers",
        "SD15_INPAINTING_UNET": "refiners_sd15.unet",
        "SD15_UNET": "refiners_sd15.unet",
        "SD1UNet": "refiners_sd15.unet",
        "UNetConfig": "refiners_sd15.unet",
    },
)

__all__ = [
    "CLIP_TEXT_G",
    "CLIP_TEXT_L",
    "CLIP_TEXT_L_PENULTIMATE",
    "DDIM",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "SD15_AUTOENCODER",
    "SD15_INPAINTING_UNET",
    "SD15_UNET",
    "AutoencoderConfig",
    "CLIPTextEncoderConfig",
    "CLIPTextEncoderG",
    "CLIPTextEncoderL",
    "CLIPTokenizer",
    "DPMSolver",
    "LatentDiffusionModel",
    "DoubleTextEncoder",
    "Euler",
    "SD1Autoencoder",
    "SD1UNet",
    "Solver",
    "StableDiffusion_1",
    "StableDiffusion_1_Inpainting",
    "UNetConfig",
    "__version__",
    "check_image_size",
    "check_input_image",
    "compute_inpainting_conditions",
    "concatenate_inpainting_conditions",
    "guidance_prompts",
]
