"""`CLIPTextEncoderConfig`, the shape of a CLIP text transformer, with CLIP ViT-L/14's values (SD1.5's text
encoder); read from a transformers `config.json` or from the tensors of an original checkpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, kw_only=True)
class CLIPTextEncoderConfig:
    """The shape of a CLIP text transformer: width, depth, heads, feed-forward width, positions and vocabulary.

    `use_quick_gelu` picks QuickGeLU (`x * sigmoid(1.702 x)`, OpenAI's CLIP) in the feed-forward blocks, else the
    exact GeLU (OpenCLIP). E.g. OpenCLIP ViT-H of SD2: `embedding_dim=1024, num_layers=23, num_attention_heads=16,
    feedforward_dim=4096, use_quick_gelu=False`. Raises ValueError if `num_attention_heads` does not divide
    `embedding_dim`.
    """

    embedding_dim: int
    num_layers: int
    num_attention_heads: int
    feedforward_dim: int
    max_sequence_length: int = 77
    vocabulary_size: int = 49408
    layer_norm_eps: float = 1e-5
    use_quick_gelu: bool = True

    def __post_init__(self) -> None:
        if self.embedding_dim % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextEncoderConfig: embedding_dim={self.embedding_dim} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )


CLIP_TEXT_L = CLIPTextEncoderConfig(embedding_dim=768, num_layers=12, num_attention_heads=12, feedforward_dim=3072)
"""OpenAI's CLIP ViT-L/14 text encoder, Stable Diffusion 1.5's (`text_encoder/config.json`)."""


_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
"""transformers' `CLIPTextConfig` defaults, which apply to the fields a config.json leaves out."""

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
"""`hidden_act` -> `use_quick_gelu`."""


def clip_text_config_from_transformers(config: dict[str, Any]) -> CLIPTextEncoderConfig:
    """The `CLIPTextEncoderConfig` of a transformers `CLIPTextModel` config.json (e.g. `text_encoder/`).

    Fields left out take transformers' `CLIPTextConfig` defaults, as transformers itself would. Fields that do not
    change the last hidden state (dropouts, initialisation, special token ids, `projection_dim`...) are ignored.

    Raises ValueError naming the field for a configuration `CLIPTextEncoderL` does not implement: another model
    type or architecture, an activation other than `quick_gelu` or `gelu`, a width not divisible by the number of
    heads, or a size that is not a positive integer.
    """
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        hint = ": pass its 'text_config'" if model_type == "clip" else ""
        raise ValueError(f"CLIP text config: 'model_type' is {model_type!r}, expected 'clip_text_model'{hint}")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if architectures != ["CLIPTextModel"]:
        raise ValueError(f"CLIP text config: 'architectures' is {architectures!r}, only ['CLIPTextModel'] is supported")
    fields = _TRANSFORMERS_DEFAULTS | {field: config[field] for field in _TRANSFORMERS_DEFAULTS if field in config}
    hidden_act = fields["hidden_act"]
    if hidden_act not in _ACTIVATIONS:
        supported = " or ".join(repr(name) for name in _ACTIVATIONS)
        raise ValueError(f"CLIP text config: 'hidden_act' is {hidden_act!r}, supported: {supported}")
    sizes = {
        field: _positive_int(field, fields[field])
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
    }
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(
            f"CLIP text config: 'num_attention_heads' ({sizes['num_attention_heads']}) does not divide "
            f"'hidden_size' ({sizes['hidden_size']})"
        )
    layer_norm_eps = fields["layer_norm_eps"]
    if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, int | float) or layer_norm_eps <= 0:
        raise ValueError(f"CLIP text config: 'layer_norm_eps' is {layer_norm_eps!r}, expected a positive number")
    return CLIPTextEncoderConfig(
        embedding_dim=sizes["hidden_size"],
        num_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        feedforward_dim=sizes["intermediate_size"],
        max_sequence_length=sizes["max_position_embeddings"],
        vocabulary_size=sizes["vocab_size"],
        layer_norm_eps=float(layer_norm_eps),
        use_quick_gelu=_ACTIVATIONS[hidden_act],
    )


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"CLIP text config: '{field}' is {value!r}, expected a positive integer")
    return value


def clip_text_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> CLIPTextEncoderConfig:
    """The `CLIPTextEncoderConfig` read from the shapes of an original checkpoint's text encoder tensors.

    Keys are without the `cond_stage_model.transformer.` prefix. Heads are not stored in the weights: CLIP uses
    heads of 64 dimensions. Raises ValueError for a tensor set that is not a CLIP text encoder.
    """
    embedding_key = "text_model.embeddings.token_embedding.weight"
    if embedding_key not in tensors:
        raise ValueError(f"not a CLIP text encoder checkpoint: no '{embedding_key}'")
    vocabulary_size, embedding_dim = tensors[embedding_key].shape
    layers = {
        int(match.group(1)) for key in tensors if (match := re.match(r"text_model\.encoder\.layers\.(\d+)\.", key))
    }
    return CLIPTextEncoderConfig(
        embedding_dim=embedding_dim,
        num_layers=len(layers),
        num_attention_heads=max(1, embedding_dim // 64),
        feedforward_dim=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_sequence_length=tensors["text_model.embeddings.position_embedding.weight"].shape[0],
        vocabulary_size=vocabulary_size,
    )
