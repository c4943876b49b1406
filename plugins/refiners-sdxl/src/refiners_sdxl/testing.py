# pyright: reportPrivateImportUsage=false
"""Helpers for tests of refiners-sdxl and of the packages built on it: small SDXL-like diffusers configs (so that a
pipeline runs on CPU in seconds), SDXL's published scheduler config, and random weights drawn per parameter. Nothing
here is used at runtime."""

from __future__ import annotations

import json
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

SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `unet/config.json`."""

SDXL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `vae/config.json`."""

SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `text_encoder/config.json` (the fields that shape the model): CLIP
ViT-L/14, SD1.5's text encoder."""

SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `text_encoder_2/config.json` (the fields that shape the model): OpenCLIP
ViT-bigG/14's text model with its projection, a `CLIPTextModelWithProjection`."""


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


def write_published_sdxl_folder(folder: Path, *, seed: int = 0) -> Path:
    """Write a diffusers `StableDiffusionXLPipeline` folder of the published SDXL base architecture with random weights
    (`randomize`) into `folder`, float32, as the published repository lays it out: `model_index.json`, `unet/`,
    `vae/`, `text_encoder/`, `text_encoder_2/` (one safetensors file each, not sharded) and `scheduler/`; the
    tokenizers are left out (`null` in `model_index.json`: ours ship with refiners-sd15). About 14 GB.

    One component is built, written and freed at a time: the peak memory is the UNet's, about 10 GB. Returns `folder`.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def without_metadata(config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items() if not key.startswith("_")}

    def diffusers_model(model_class: Any, config: dict[str, Any]) -> torch.nn.Module:
        with torch.device("meta"):  # no initialisation: `randomize` draws every parameter
            model: torch.nn.Module = model_class(**without_metadata(config))
        if next(model.buffers(), None) is not None:
            raise RuntimeError(f"{type(model).__name__} has buffers, which `to_empty` would leave uninitialised")
        return model.to_empty(device="cpu")

    folder.mkdir(parents=True, exist_ok=True)
    writers: list[tuple[str, Any]] = [
        ("unet", lambda: diffusers_model(UNet2DConditionModel, SDXL_BASE_UNET_CONFIG)),
        ("vae", lambda: diffusers_model(AutoencoderKL, SDXL_VAE_CONFIG)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))),
    ]
    for index, (name, build) in enumerate(writers):
        model = build()
        randomize(model, seed + index)
        model.save_pretrained(folder / name, safe_serialization=True, max_shard_size="20GB")
        del model
    scheduler: Any = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # pyright: ignore[reportUnknownMemberType]
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder
