# pyright: reportPrivateImportUsage=false
"""Helpers for tests of refiners-sdxl and of the packages built on it: small SDXL-like diffusers configs (so that a
pipeline runs on CPU in seconds), SDXL's published scheduler config, and random weights drawn per parameter. Nothing
here is used at runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TIME_ID_DIM = 8
"""Features per time id in the small UNets."""
L_DIM, G_DIM, POOLED_DIM = 32, 48, 40
"""Widths of the small CLIP-L-like and CLIP-G-like text encoders, and of CLIP-G's projected pooled embedding."""

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
"""`UNet2DConditionModel` arguments of a small SDXL base-like UNet: two levels, attention on the second, CLIP-L + CLIP-G
text, the `text_time` added embedding of the pooled embedding and six time ids."""

SMALL_INPAINTING_UNET: dict[str, Any] = {**SMALL_UNET, "in_channels": 9}
"""`SMALL_UNET` with latents, mask and masked image latents in (4 + 1 + 4 channels)."""

SMALL_REFINER_UNET: dict[str, Any] = {
    **SMALL_UNET,
    "cross_attention_dim": G_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 5 * TIME_ID_DIM,
}
"""`SMALL_UNET` as a refiner: CLIP-G text only, five time ids (with the aesthetic score)."""

SMALL_VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}
"""`AutoencoderKL` arguments of a small 4-level autoencoder with SDXL's latent scale (8x downscaling)."""

SMALL_TEXT: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77}
"""`CLIPTextConfig` arguments the small text encoders share."""
SMALL_TEXT_L: dict[str, Any] = {**SMALL_TEXT, "hidden_size": L_DIM, "intermediate_size": 64}
"""`CLIPTextConfig` arguments of a small CLIP-L-like `CLIPTextModel`."""
SMALL_TEXT_G: dict[str, Any] = {
    **SMALL_TEXT,
    "hidden_size": G_DIM,
    "intermediate_size": 96,
    "projection_dim": POOLED_DIM,
    "hidden_act": "gelu",
}
"""`CLIPTextConfig` arguments of a small CLIP-G-like `CLIPTextModelWithProjection`."""

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
"""stabilityai/stable-diffusion-xl-base-1.0, `scheduler/scheduler_config.json` (the refiner's is the same)."""

SDXL_TOKENIZER_2_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
}  # fmt: skip
"""stabilityai/stable-diffusion-xl-base-1.0, `tokenizer_2/tokenizer_config.json` (CLIP-G's: pads with `!`)."""


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter independently (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1)),
    so that no layer is an identity and a wrong weight mapping shows."""
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
    """A diffusers `StableDiffusionXLPipeline` of `SMALL_UNET`, `SMALL_VAE`, `SMALL_TEXT_L`, `SMALL_TEXT_G` and
    `SDXL_SCHEDULER`, randomized with fixed seeds (no tokenizers: ours ship with refiners-sd15), progress bar off."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**SMALL_UNET).eval()
    vae = AutoencoderKL(**SMALL_VAE).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**SMALL_TEXT_L)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SMALL_TEXT_G)).eval()
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


def write_small_sdxl_refiner_folder(folder: Path) -> Path:
    """Save a small SDXL refiner as a diffusers folder in `folder` (a `StableDiffusionXLImg2ImgPipeline` of
    `SMALL_REFINER_UNET`, randomized with its own seed, and `small_sdxl_pipeline()`'s autoencoder, CLIP-G-like text
    encoder and scheduler; no `text_encoder`, aesthetic-score time ids), and return it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = small_sdxl_pipeline()
    unet = UNet2DConditionModel(**SMALL_REFINER_UNET).eval()
    randomize(unet, 4)
    StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,  # pyright: ignore[reportArgumentType]
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        add_watermarker=False,
    ).save_pretrained(folder)
    return folder
