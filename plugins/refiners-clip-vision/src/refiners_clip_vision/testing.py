"""Helpers for tests of refiners-clip-vision and of the packages built on it: small CLIP image encoder configs, and
transformers' `CLIPVisionModelWithProjection` of a config with random weights (transformers is imported only by the
functions that need it). Nothing here is used at runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from refiners_clip_vision.config import CLIPImageEncoderConfig

SMALL_VIT_H = CLIPImageEncoderConfig(
    embedding_dim=32,
    num_layers=3,
    num_attention_heads=2,
    feedforward_dim=64,
    projection_dim=24,
    image_size=56,
    patch_size=14,
)
"""A small ViT-H-like encoder (exact GeLU, 16 patches of 14 pixels), projecting to 24."""

SMALL_VIT_BIGG = CLIPImageEncoderConfig(
    embedding_dim=40,
    num_layers=2,
    num_attention_heads=4,
    feedforward_dim=96,
    projection_dim=32,
    image_size=42,
    patch_size=14,
)
"""A small ViT-bigG-like encoder, of other widths than `SMALL_VIT_H` (so that the two are told apart)."""


def transformers_config(config: CLIPImageEncoderConfig) -> dict[str, Any]:
    """The `CLIPVisionConfig` arguments of `config`."""
    return {
        "hidden_size": config.embedding_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.feedforward_dim,
        "projection_dim": config.projection_dim,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": "quick_gelu" if config.use_quick_gelu else "gelu",
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter independently (weights ~ N(0, 1/fan_in), biases and embeddings ~ N(0, 0.1), norm scales
    ~ N(1, 0.1)), so that no layer is an identity and a wrong weight mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1 and "position" not in name:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith(".weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.1 * noise)


def reference_encoder(config: CLIPImageEncoderConfig, seed: int = 0) -> Any:
    """transformers' `CLIPVisionModelWithProjection` of `config`, randomized with `seed`, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**transformers_config(config)))
    model = model.to_empty(device="cpu").eval()
    randomize(model, seed)
    embeddings = model.vision_model.embeddings
    embeddings.position_ids.copy_(torch.arange(config.num_patches + 1).unsqueeze(0))  # a buffer to_empty leaves unset
    return model


def write_reference_folder(folder: Path, config: CLIPImageEncoderConfig, seed: int = 0) -> Path:
    """Save `reference_encoder(config, seed)` as a transformers folder (`config.json`, `model.safetensors`), as the
    `image_encoder/` folders of IP-Adapter releases hold it, and return `folder`."""
    reference_encoder(config, seed).save_pretrained(folder)
    return folder
