"""Key mappings from CLIP text encoder weight files to `CLIPTextEncoderL`, and its configuration from a config.json.

Keys of the published files are those of transformers' `CLIPTextModel` as transformers 4.x writes them
(`text_model.encoder.layers.0.self_attn.q_proj.weight`): the `text_encoder/` folder of a diffusers repository and,
after the `cond_stage_model.transformer.` prefix, the original single-file checkpoints. transformers 5.6 and later
write the same keys without `text_model.`: pass `prefix=""` for files saved by them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch

from refiners_sd15.loading import ComponentFormat

CLIP_TEXT_IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})
"""File keys that carry nothing the encoder needs: the `0..76` position ids buffer some checkpoints include."""

_ENCODER_LAYER = (
    ("layer_norm1", "SelfAttentionBlock.LayerNorm"),
    ("self_attn.q_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_1"),
    ("self_attn.k_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_2"),
    ("self_attn.v_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_3"),
    ("self_attn.out_proj", "SelfAttentionBlock.SelfAttention.Linear"),
    ("layer_norm2", "FeedForwardBlock.LayerNorm"),
    ("mlp.fc1", "FeedForwardBlock.Linear_1"),
    ("mlp.fc2", "FeedForwardBlock.Linear_2"),
)


def transformers_clip_text_mapping(num_layers: int = 12, *, prefix: str = "text_model.") -> dict[str, str]:
    """transformers `CLIPTextModel` state_dict key -> `CLIPTextEncoderL` state_dict key.

    `prefix` starts every file key: `"text_model."` in files written by transformers 4.x (every published SD1.5
    checkpoint), `""` in files written by transformers >= 5.6. Keys in `CLIP_TEXT_IGNORED_KEYS` are not mapped:
    pass them as `ignore` to `load_state_dict_checked`.
    """
    return {f"{prefix}{theirs}": ours for theirs, ours in _keys(num_layers)}


def ldm_clip_text_mapping(num_layers: int = 12) -> dict[str, str]:
    """Original (CompVis/ldm single-file) text encoder key -> `CLIPTextEncoderL` state_dict key.

    Keys are those of the `cond_stage_model.transformer.` part of a checkpoint, without that prefix: the
    transformers 4.x keys (`text_model.encoder.layers.0...`), as diffusers' `convert_ldm_clip_checkpoint` reads them.
    """
    return transformers_clip_text_mapping(num_layers, prefix="text_model.")


def _keys(num_layers: int) -> Iterator[tuple[str, str]]:
    yield "embeddings.token_embedding.weight", "Sum.TokenEncoder.weight"
    yield "embeddings.position_embedding.weight", "Sum.PositionalEncoder.weight"
    for index in range(num_layers):
        ours = "TransformerLayer" if num_layers == 1 else f"TransformerLayer_{index + 1}"
        for theirs_layer, our_layer in _ENCODER_LAYER:
            for param in ("weight", "bias"):
                yield f"encoder.layers.{index}.{theirs_layer}.{param}", f"{ours}.{our_layer}.{param}"
    for param in ("weight", "bias"):
        yield f"final_layer_norm.{param}", f"LayerNorm.{param}"


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


def clip_text_config_from_transformers(config: dict[str, Any]) -> dict[str, Any]:
    """`CLIPTextEncoderL` keyword arguments from a transformers `CLIPTextModel` config.json (e.g. `text_encoder/`).

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
    return {
        "embedding_dim": sizes["hidden_size"],
        "num_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "feedforward_dim": sizes["intermediate_size"],
        "max_sequence_length": sizes["max_position_embeddings"],
        "vocabulary_size": sizes["vocab_size"],
        "layer_norm_eps": float(layer_norm_eps),
        "use_quick_gelu": _ACTIVATIONS[hidden_act],
    }


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"CLIP text config: '{field}' is {value!r}, expected a positive integer")
    return value


def _transformers_mapping(architecture: dict[str, Any], file_keys: Collection[str]) -> dict[str, str]:
    # transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` level that published files have.
    prefix = "text_model." if any(key.startswith("text_model.") for key in file_keys) else ""
    return transformers_clip_text_mapping(architecture["num_layers"], prefix=prefix)


def clip_text_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`CLIPTextEncoderL` keyword arguments read from the shapes of an original checkpoint's text encoder tensors.

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
    return {
        "embedding_dim": embedding_dim,
        "num_layers": len(layers),
        "num_attention_heads": max(1, embedding_dim // 64),
        "feedforward_dim": tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "max_sequence_length": tensors["text_model.embeddings.position_embedding.weight"].shape[0],
        "vocabulary_size": vocabulary_size,
    }


TEXT_ENCODER_FORMAT = ComponentFormat(
    name="text_encoder",
    subfolder="text_encoder",
    weight_stems=("model", "pytorch_model"),
    config_to_kwargs=clip_text_config_from_transformers,
    diffusers_mapping=_transformers_mapping,
    single_file_prefix="cond_stage_model.transformer.",
    single_file_mapping=lambda architecture: ldm_clip_text_mapping(architecture["num_layers"]),
    single_file_config=clip_text_config_from_ldm,
    architecture=lambda encoder: {
        name: getattr(encoder, name)
        for name in (
            "embedding_dim",
            "num_layers",
            "num_attention_heads",
            "feedforward_dim",
            "max_sequence_length",
            "vocabulary_size",
            "layer_norm_eps",
            "use_quick_gelu",
        )
    },
    ignored_keys=CLIP_TEXT_IGNORED_KEYS,
)
