"""Stable Diffusion 1.5 for refiners: CLIP text encoder and tokenizer, UNet, autoencoder, solvers and pipelines.

from refiners_sd15 import StableDiffusion_1

sd = StableDiffusion_1.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16)
"""

from importlib.metadata import PackageNotFoundError, version

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
