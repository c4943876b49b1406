"""The Stable Diffusion 1.5 autoencoder ("lda"): images to latents and back."""

from refiners_sd15.autoencoder.autoencoder import Decoder, Encoder, SD1Autoencoder, image_to_tensor, tensor_to_image
from refiners_sd15.autoencoder.mapping import (
    AUTOENCODER_FORMAT,
    autoencoder_config_from_diffusers,
    diffusers_autoencoder_mapping,
    ldm_autoencoder_mapping,
)

__all__ = [
    "AUTOENCODER_FORMAT",
    "Decoder",
    "Encoder",
    "SD1Autoencoder",
    "autoencoder_config_from_diffusers",
    "diffusers_autoencoder_mapping",
    "image_to_tensor",
    "ldm_autoencoder_mapping",
    "tensor_to_image",
]
