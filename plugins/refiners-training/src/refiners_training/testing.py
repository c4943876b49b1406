"""A small SD1.5-shaped diffusers folder with random weights (diffusers' UNet2DConditionModel and AutoencoderKL,
transformers' CLIPTextModel, saved with `save_pretrained`), and small image datasets, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SMALL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SMALL_CLIP: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
SMALL_VAE: dict[str, Any] = {  # one level: latents have the images' size
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
RED = (230, 30, 30)


def write_small_sd15(folder: Path) -> Path:
    """A diffusers SD1.5 folder (`unet/`, `text_encoder/`, `vae/`) of small random models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # type: ignore[import-untyped]
    from transformers import CLIPTextConfig, CLIPTextModel  # type: ignore[import-untyped]

    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_UNET).save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    CLIPTextModel(CLIPTextConfig(**SMALL_CLIP)).save_pretrained(folder / "text_encoder")  # pyright: ignore[reportUnknownMemberType]
    AutoencoderKL(**SMALL_VAE).save_pretrained(folder / "vae")  # pyright: ignore[reportUnknownMemberType]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def write_colour_patches(folder: Path, count: int = 3, scale: int = 1) -> Path:
    """`count` images of the same red patch at different sizes (`scale` times (16 + 4i) x (16 or 24) pixels, so
    resizing and cropping apply), one caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (scale * (16 + 4 * index), scale * (16 + 8 * (index % 2)))
        Image.new("RGB", size, RED).save(folder / f"patch-{index}.png")
        (folder / f"patch-{index}.txt").write_text("a red square", encoding="utf-8")
    return folder


def toml_config(model: Path, data: Path, output_dir: Path, /, **sections: dict[str, Any]) -> str:
    """A TOML configuration for the small model and dataset; `sections` add or replace keys per section."""
    values: dict[str, dict[str, Any]] = {
        "model": {"base": str(model)},
        "data": {"path": str(data), "resolution": 16},
        "training": {"output_dir": str(output_dir)},
    }
    for name, keys in sections.items():
        values.setdefault(name, {}).update(keys)
    lines: list[str] = []
    for name, keys in values.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"
