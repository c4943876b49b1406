"""Helpers for tests of refiners-ip-adapter and of the packages that stack adapters with it: random IP-Adapter weights
in the released layout for a small UNet, and the folder diffusers' `load_ip_adapter` reads. Nothing here is used at
runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from refiners_clip_vision import CLIPImageEncoderConfig
from refiners_clip_vision.testing import write_reference_folder
from refiners_core.weights import save_tensors
from refiners_ip_adapter.weights import Projection

SMALL_SD15_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 16,
}
"""`UNet2DConditionModel` arguments of a small SD1-like UNet: three levels, cross-attention on the first two (7 text
cross-attentions), text of 24 features."""


def released_weights(
    projection: Projection,
    *,
    image_embedding_dim: int,
    cross_attention_dim: int,
    inner_dims: list[int],
    num_tokens: int = 4,
    hidden_dim: int = 32,
    depth: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights in the released layout (`image_proj.*`, `ip_adapter.1.*`, `ip_adapter.3.*`...):
    a linear projection to `num_tokens` tokens, or a Perceiver resampler of `num_tokens` queries (`hidden_dim` wide,
    `depth` blocks (diffusers reads 4, as released), one head of 64, feed-forward 4 times wider); one `to_k_ip` /
    `to_v_ip` pair per cross-attention of `inner_dims`. Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales
    ~ N(1, 0.1)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5

    def vector(size: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.1 * torch.randn(size, generator=generator)

    tensors: dict[str, torch.Tensor] = {}
    if projection == "linear":
        tensors["image_proj.proj.weight"] = weight(num_tokens * cross_attention_dim, image_embedding_dim)
        tensors["image_proj.proj.bias"] = vector(num_tokens * cross_attention_dim)
        tensors["image_proj.norm.weight"] = vector(cross_attention_dim, 1.0)
        tensors["image_proj.norm.bias"] = vector(cross_attention_dim)
    else:
        inner, feedforward = 64, 4 * hidden_dim
        tensors["image_proj.latents"] = torch.randn(1, num_tokens, hidden_dim, generator=generator) / hidden_dim**0.5
        tensors["image_proj.proj_in.weight"] = weight(hidden_dim, image_embedding_dim)
        tensors["image_proj.proj_in.bias"] = vector(hidden_dim)
        tensors["image_proj.proj_out.weight"] = weight(cross_attention_dim, hidden_dim)
        tensors["image_proj.proj_out.bias"] = vector(cross_attention_dim)
        tensors["image_proj.norm_out.weight"] = vector(cross_attention_dim, 1.0)
        tensors["image_proj.norm_out.bias"] = vector(cross_attention_dim)
        for index in range(depth):
            block = f"image_proj.layers.{index}"
            for norm in ("0.norm1", "0.norm2", "1.0"):
                tensors[f"{block}.{norm}.weight"] = vector(hidden_dim, 1.0)
                tensors[f"{block}.{norm}.bias"] = vector(hidden_dim)
            tensors[f"{block}.0.to_q.weight"] = weight(inner, hidden_dim)
            tensors[f"{block}.0.to_kv.weight"] = weight(2 * inner, hidden_dim)
            tensors[f"{block}.0.to_out.weight"] = weight(hidden_dim, inner)
            tensors[f"{block}.1.1.weight"] = weight(feedforward, hidden_dim)
            tensors[f"{block}.1.3.weight"] = weight(hidden_dim, feedforward)
    for index, inner_dim in enumerate(inner_dims):
        tensors[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = weight(inner_dim, cross_attention_dim)
        tensors[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = weight(inner_dim, cross_attention_dim)
    return tensors


def write_released_weights(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` as released: flat keys in a `.safetensors` file, or for a `.bin` path `torch.save` of
    `{"image_proj": {...}, "ip_adapter": {...}}`. Returns `path`."""
    if path.suffix == ".safetensors":
        save_tensors(path, tensors)
        return path
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in tensors.items():
        group, name = key.split(".", 1)
        nested[group][name] = tensor
    torch.save(nested, path)
    return path


def write_release_folder(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], encoder: CLIPImageEncoderConfig, seed: int = 0
) -> Path:
    """`folder/name` (the weights, see `write_released_weights`) and `folder/image_encoder/` (transformers'
    `CLIPVisionModelWithProjection` of `encoder`, random weights from `seed`), as h94/IP-Adapter lays them out and
    diffusers' `load_ip_adapter(folder, subfolder="", weight_name=name)` reads them. Returns the weights' path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_reference_folder(folder / "image_encoder", encoder, seed=seed)
    return write_released_weights(folder / name, tensors)
