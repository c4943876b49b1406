"""Helpers for tests of refiners-t2i-adapter: the references of the parity tests, diffusers' `T2IAdapter` and
`UNet2DConditionModel` built offline from small configs (and the published SD1.5 full adapter's) with random weights,
saved in the published layout. Needs diffusers and refiners-sdxl (test extras); nothing here is used at runtime."""

# pyright: reportPrivateImportUsage=false
# diffusers exports its classes lazily, which pyright reads as private imports.
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from PIL import Image

from refiners_sdxl.testing import SMALL_THREE_LEVEL_UNET, random_diffusers_model

# A small SD1-like UNet: three levels, cross-attention on the first two (their features go before the downsampling),
# none on the last (its feature goes after its last block), as in SD1.5.
SMALL_UNET_CONFIG: dict[str, Any] = {
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}
# The ControlNet of that UNet (with a smaller conditioning image encoder).
SMALL_CONTROLNET_CONFIG: dict[str, Any] = {
    key: value for key, value in SMALL_UNET_CONFIG.items() if key not in ("up_block_types", "sample_size")
} | {"conditioning_embedding_out_channels": [8, 16, 16, 32]}

# Adapters of that UNet: features of 32, 64, 64 channels at 1/8, 1/16, 1/32 of the image.
SMALL_FULL_ADAPTER: dict[str, Any] = {"in_channels": 3, "channels": [32, 64, 64], "num_res_blocks": 2}
SMALL_LIGHT_ADAPTER: dict[str, Any] = {
    "in_channels": 3,
    "channels": [32, 64],
    "num_res_blocks": 2,
    "adapter_type": "light_adapter",
}
SMALL_GRAY_ADAPTER: dict[str, Any] = {**SMALL_FULL_ADAPTER, "in_channels": 1}

# The architecture of TencentARC/t2iadapter_canny_sd15v2 (config.json's fields; canny and sketch read grayscale images,
# the other SD1.5 full adapters RGB ones)
SD15_CANNY_ADAPTER: dict[str, Any] = {
    "_class_name": "T2IAdapter",
    "adapter_type": "full_adapter",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 8,
    "in_channels": 1,
    "num_res_blocks": 2,
}

# TencentARC/t2iadapter_color_sd14v1, config.json (the light adapter: no downscale_factor, diffusers' 8)
SD14_COLOR_ADAPTER: dict[str, Any] = {
    "_class_name": "T2IAdapter",
    "_diffusers_version": "0.18.0.dev0",
    "adapter_type": "light_adapter",
    "channels": [320, 640, 1280],
    "in_channels": 3,
    "num_res_blocks": 4,
}

# The architecture of TencentARC/t2i-adapter-canny-sdxl-1.0 (config.json's fields, as its fine-tunes publish them)
SDXL_CANNY_ADAPTER: dict[str, Any] = {
    "_class_name": "T2IAdapter",
    "adapter_type": "full_adapter_xl",
    "channels": [320, 640, 1280, 1280],
    "downscale_factor": 16,
    "in_channels": 3,
    "num_res_blocks": 2,
}

# A small SDXL-like UNet with SDXL's three kinds of level: no attention and a downsampling, attention and a
# downsampling, attention; and its full_adapter_xl (features at 1/16, 1/16, 1/32 and after the middle block, 1/32).
SMALL_SDXL_UNET_CONFIG: dict[str, Any] = SMALL_THREE_LEVEL_UNET
SMALL_XL_ADAPTER: dict[str, Any] = {
    "in_channels": 1,
    "channels": [32, 64, 64, 64],
    "num_res_blocks": 1,
    "downscale_factor": 16,
    "adapter_type": "full_adapter_xl",
}


def reference_adapter(config: dict[str, Any], seed: int = 1) -> T2IAdapter:
    """diffusers' `T2IAdapter` of `config`, every parameter drawn at random (biases too)."""
    return random_diffusers_model(T2IAdapter, config, seed)


def reference_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """diffusers' `UNet2DConditionModel` of `config`, every parameter drawn at random."""
    return random_diffusers_model(UNet2DConditionModel, config, seed)


def reference_controlnet(config: dict[str, Any], seed: int = 2) -> ControlNetModel:
    """diffusers' `ControlNetModel` of `config`, every parameter drawn at random."""
    return random_diffusers_model(ControlNetModel, config, seed)


def save_adapter(adapter: T2IAdapter, folder: Path, safe: bool = True) -> Path:
    """`adapter` in the published layout: `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`)."""
    adapter.save_pretrained(folder, safe_serialization=safe)  # pyright: ignore[reportUnknownMemberType]
    return folder


def random_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A random `mode` image of `size` (width, height): noise, so that every feature depends on every pixel."""
    width, height = size
    bands = 1 if mode == "L" else 3
    pixels = torch.randint(
        0, 256, (height, width, bands), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return Image.fromarray(pixels.squeeze(-1).numpy() if bands == 1 else pixels.numpy())
