"""Helpers for tests of refiners-sd15 and of the packages built on it: original-layout checkpoints written from
transformers state dicts. Nothing here is used at runtime."""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
