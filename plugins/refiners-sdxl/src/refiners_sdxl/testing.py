# pyright: reportPrivateImportUsage=false
"""Helpers for tests of refiners-sdxl and of the packages built on it: a small diffusers `StableDiffusionXLPipeline`
with random weights (an SDXL-like UNet with the `text_time` added embedding, a CLIP-L-like `CLIPTextModel`, a
CLIP-G-like `CLIPTextModelWithProjection`, a 4-level autoencoder, SDXL's published Euler scheduler config), saved as
a diffusers folder that `StableDiffusion_XL.from_pretrained` and `refiners generate` read. Nothing here is used at
runtime: it needs diffusers and transformers (the `test` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TIME_ID_DIM = 8
L_DIM, G_DIM, POOLED_DIM = 32, 48, 40

SMALL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [1, 2],
    "transformer_layers_per_block": [1, 2],
    "norm_num_groups": 32,
    "cross_attention_dim": L_DIM + G_DIM,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": TIME_ID_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_ID_DIM,
}
"""diffusers `UNet2DConditionModel` arguments of a 2-level SDXL-like UNet."""
SMALL_VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}
"""diffusers `AutoencoderKL` arguments of a narrow autoencoder with SDXL's 8x downscaling and scaling factor."""
TEXT: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77}
"""transformers `CLIPTextConfig` arguments shared by both small text encoders."""
SDXL_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
"""stabilityai/stable-diffusion-xl-base-1.0's `scheduler/scheduler_config.json`."""


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter independently (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1)), so
    that no layer is an identity and every output depends on every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith(".weight"):
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def small_sdxl_pipeline() -> Any:
    """A diffusers `StableDiffusionXLPipeline` of the small components above, randomized with fixed seeds (no
    tokenizers: our tokenizers ship with refiners-sd15), its progress bar off."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**SMALL_UNET).eval()
    vae = AutoencoderKL(**SMALL_VAE).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=L_DIM, intermediate_size=64, **TEXT)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=G_DIM, intermediate_size=96, projection_dim=POOLED_DIM, hidden_act="gelu", **TEXT)
    ).eval()
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize(model, seed)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),  # pyright: ignore[reportArgumentType]
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_small_sdxl_folder(folder: Path) -> Path:
    """Save `small_sdxl_pipeline()` as a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    `text_encoder_2/`, `scheduler/`) in `folder`, and return it."""
    small_sdxl_pipeline().save_pretrained(folder)
    return folder
