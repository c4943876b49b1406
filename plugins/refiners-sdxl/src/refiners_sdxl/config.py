"""The published SDXL components as refiners-sd15's config dataclasses, with SDXL's values.

Each UNet config is the `unet/config.json` of the published diffusers repository, as `unet_config_from_diffusers`
reads it; `attention_head_dim` is, as in those files, the number of heads per level (64 channels per head).
"""

from __future__ import annotations

from dataclasses import replace

from refiners_sd15.autoencoder import SD15_AUTOENCODER
from refiners_sd15.unet import UNetConfig

SDXL_BASE_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    cross_attention_levels=(False, True, True),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
"""The UNet of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, `unet/config.json`): no attention on the
first level, 2 then 10 transformer blocks on the others (the first level's 1 is unused), CLIP-L + CLIP-G text
(768 + 1280 = 2048), and the `text_time` added embedding of the pooled CLIP-G embedding (1280) and six time ids
(original size, crop top-left, target size: 6 x 256), 1280 + 1536 = 2816 features."""

SDXL_REFINER_UNET = UNetConfig(
    block_out_channels=(384, 768, 1536, 1536),
    attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280,
    cross_attention_levels=(False, True, True, False),
    transformer_layers_per_block=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
"""The UNet of the SDXL refiner 1.0 (stabilityai/stable-diffusion-xl-refiner-1.0, `unet/config.json`): 384 base
channels on four levels, attention on the middle two and in the middle block, 4 transformer blocks each, CLIP-G
text only (1280), and five time ids (original size, crop top-left, aesthetic score: 5 x 256) with the pooled
embedding, 1280 + 1280 = 2560 features. Its original config (Stability-AI/generative-models,
`configs/inference/sd_xl_refiner.yaml`): `model_channels: 384`, `channel_mult: [1, 2, 4, 4]`,
`attention_resolutions: [4, 2]`, `num_head_channels: 64`, `transformer_depth: 4`, `adm_in_channels: 2560`."""

SDXL_INPAINTING_UNET = replace(SDXL_BASE_UNET, in_channels=9)
"""The UNet of SDXL inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1, `unet/config.json`): the base
UNet with latents, mask and masked image latents in, 4 + 1 + 4 channels."""

SDXL_AUTOENCODER = replace(SD15_AUTOENCODER, scaling_factor=0.13025)
"""The autoencoder of SDXL (stabilityai/stable-diffusion-xl-base-1.0, `vae/config.json`): SD1.5's architecture, with
latents scaled by 0.13025. The fp16-fixed VAE (madebyollin/sdxl-vae-fp16-fix) has the same config."""
