"""The Stable Diffusion 1.5 autoencoder ("lda"): images to latents and back."""

from refiners_sd15.autoencoder.autoencoder import Decoder, Encoder, SD1Autoencoder, image_to_tensor, tensor_to_image
from refiners_sd15.autoencoder.config import (
    SD15_AUTOENCODER,
    AutoencoderConfig,
    autoencoder_config_from_diffusers,
    autoencoder_config_from_ldm,
)
from refiners_sd15.autoencoder.mapping import (
    AUTOENCODER_FORMAT,
    diffusers_autoencoder_mapping,
    ldm_autoencoder_mapping,
)

__all__ = [
    "AUTOENCODER_FORMAT",
    "SD15_AUTOENCODER",
    "AutoencoderConfig",
    "Decoder",
    "Encoder",
    "SD1Autoencoder",
    "autoencoder_config_from_diffusers",
    "autoencoder_config_from_ldm",
    "diffusers_autoencoder_mapping",
    "image_to_tensor",
    "ldm_autoencoder_mapping",
    "tensor_to_image",
]
