"""Helpers for tests of refiners-sd15 and of the packages built on it: small SD1.5 components with random weights,
and original-layout checkpoints written from transformers state dicts. Nothing here is used at runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from refiners_sd15.autoencoder import SD15_AUTOENCODER, SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_sd15.unet import SD1UNet, UNetConfig

_OPEN_CLIP_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The OpenCLIP text tower of a transformers `CLIPTextModelWithProjection` state dict of `num_layers` layers, as
    `conditioner.embedders.1.model.*` of SDXL's single files holds it: fused attention projections, `text_projection`
    multiplied from the right, and the contrastive `logit_scale`."""
    theirs = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    tensors = {
        "token_embedding.weight": theirs["embeddings.token_embedding.weight"],
        "positional_embedding": theirs["embeddings.position_embedding.weight"],
        "ln_final.weight": theirs["final_layer_norm.weight"],
        "ln_final.bias": theirs["final_layer_norm.bias"],
        "text_projection": theirs["text_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    for index in range(num_layers):
        layer, block = f"encoder.layers.{index}", f"transformer.resblocks.{index}"
        for param in ("weight", "bias"):
            for their_name, open_clip_name in _OPEN_CLIP_NAMES.items():
                tensors[f"{block}.{open_clip_name}.{param}"] = theirs[f"{layer}.{their_name}.{param}"]
            tensors[f"{block}.attn.in_proj_{param}"] = torch.cat(
                [theirs[f"{layer}.self_attn.{name}_proj.{param}"] for name in "qkv"]
            )
    return tensors


def small_sd15_components(in_channels: int) -> dict[str, torch.nn.Module]:
    """`unet`, `lda` and `clip_text_encoder` of a scaled-down SD1.5 (32 channels, one layer each) with random weights
    drawn from seed `in_channels`, as keyword arguments of `StableDiffusion_1` (`in_channels` 4) or
    `StableDiffusion_1_Inpainting` (9)."""
    torch.manual_seed(in_channels)
    return {
        "unet": SD1UNet(
            UNetConfig(
                in_channels=in_channels,
                block_out_channels=(32, 32),
                layers_per_block=1,
                attention_head_dim=4,
                cross_attention_dim=32,
                cross_attention_levels=(True, False),
            )
        ),
        "lda": SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        "clip_text_encoder": CLIPTextEncoderL(
            CLIPTextEncoderConfig(embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
        ),
    }
