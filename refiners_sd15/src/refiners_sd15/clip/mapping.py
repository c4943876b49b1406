"""Key mappings from CLIP text encoder weight files to `CLIPTextEncoderL` and `CLIPTextEncoderG`.

Keys of the published files are those of transformers' `CLIPTextModel` as transformers 4.x writes them
(`text_model.encoder.layers.0.self_attn.q_proj.weight`): the `text_encoder/` folder of a diffusers repository and,
after the `cond_stage_model.transformer.` prefix (SD1.5) or `conditioner.embedders.0.transformer.` (SDXL), the
original single-file checkpoints. transformers 5.6 and later write the same keys without `text_model.`: pass
`prefix=""` for files saved by them. A `CLIPTextModelWithProjection` (SDXL's `text_encoder_2/`) adds
`text_projection.weight`, and keeps `text_model.` in every transformers version.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch

from refiners_sd15.clip.config import (
    CLIP_TEXT_G,
    CLIP_TEXT_L,
    CLIPTextEncoderConfig,
    clip_text_config_from_ldm,
    clip_text_config_from_open_clip,
    clip_text_config_from_transformers,
)
from refiners_sd15.loading import ComponentFormat

CLIP_TEXT_IGNORED_KEYS = frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})
"""File keys that carry nothing the encoder needs: the `0..76` position ids buffer some checkpoints include."""

OPEN_CLIP_TEXT_IGNORED_KEYS = frozenset({"logit_scale"})
"""OpenCLIP text tower keys that carry nothing the encoder needs: the contrastive loss's temperature."""

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


def transformers_clip_text_mapping(
    config: CLIPTextEncoderConfig = CLIP_TEXT_L, *, prefix: str = "text_model."
) -> dict[str, str]:
    """transformers `CLIPTextModel` (or `CLIPTextModelWithProjection`) state_dict key -> `CLIPTextEncoderL` state_dict
    key, for the encoder `config` describes (its `num_layers`, `output` and `projection_dim` shape the mapping).

    `prefix` starts every file key of the text model: `"text_model."` in files written by transformers 4.x (every
    published checkpoint) and in every `CLIPTextModelWithProjection` file, `""` in `CLIPTextModel` files written by
    transformers >= 5.6. The projection is `text_projection.weight`, without prefix. Keys in `CLIP_TEXT_IGNORED_KEYS`
    are not mapped: pass them as `ignore` to `load_state_dict_checked`.
    """
    mapping = {f"{prefix}{theirs}": ours for theirs, ours in _keys(config)}
    projection = _our_paths(config).projection
    if projection is not None:
        mapping["text_projection.weight"] = f"{projection}.weight"
    return mapping


def ldm_clip_text_mapping(config: CLIPTextEncoderConfig = CLIP_TEXT_L) -> dict[str, str]:
    """Original (CompVis/ldm single-file) text encoder key -> `CLIPTextEncoderL` state_dict key.

    Keys are those of the `cond_stage_model.transformer.` part of a checkpoint, without that prefix: the
    transformers 4.x keys (`text_model.encoder.layers.0...`), as diffusers' `convert_ldm_clip_checkpoint` reads them.
    """
    return transformers_clip_text_mapping(config, prefix="text_model.")


class _OurPaths(NamedTuple):
    layers: list[str]
    final_norm: str
    projection: str | None


def _our_paths(config: CLIPTextEncoderConfig) -> _OurPaths:
    """Our paths of the transformer layers (in order), of the final norm and of the text projection."""
    if config.output == "last_hidden_state":
        return _OurPaths(_numbered("TransformerLayer", config.num_layers), "LayerNorm", None)
    pooled = "Parallel.PooledTextEmbedding"
    return _OurPaths(
        [*_numbered("TransformerLayer", config.num_layers - 1), f"{pooled}.TransformerLayer"],
        f"{pooled}.LayerNorm",
        None if config.projection_dim is None else f"{pooled}.Linear",
    )


def _numbered(name: str, count: int) -> list[str]:
    """The names a Chain gives `count` sibling layers of one class."""
    return [name] if count == 1 else [f"{name}_{index + 1}" for index in range(count)]


def _keys(config: CLIPTextEncoderConfig) -> Iterator[tuple[str, str]]:
    paths = _our_paths(config)
    yield "embeddings.token_embedding.weight", "Sum.TokenEncoder.weight"
    yield "embeddings.position_embedding.weight", "Sum.PositionalEncoder.weight"
    for index, ours in enumerate(paths.layers):
        for theirs_layer, our_layer in _ENCODER_LAYER:
            for param in ("weight", "bias"):
                yield f"encoder.layers.{index}.{theirs_layer}.{param}", f"{ours}.{our_layer}.{param}"
    for param in ("weight", "bias"):
        yield f"final_layer_norm.{param}", f"{paths.final_norm}.{param}"


def _transformers_mapping(config: CLIPTextEncoderConfig, file_keys: Collection[str]) -> dict[str, str]:
    # transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` level that published files have.
    prefix = "text_model." if any(key.startswith("text_model.") for key in file_keys) else ""
    return transformers_clip_text_mapping(config, prefix=prefix)


TEXT_ENCODER_FORMAT = ComponentFormat(
    name="text_encoder",
    subfolder="text_encoder",
    weight_stems=("model", "pytorch_model"),
    config_class=CLIPTextEncoderConfig,
    config_from_diffusers=clip_text_config_from_transformers,
    diffusers_mapping=_transformers_mapping,
    single_file_prefix="cond_stage_model.transformer.",
    single_file_mapping=ldm_clip_text_mapping,
    single_file_config=clip_text_config_from_ldm,
    ignored_keys=CLIP_TEXT_IGNORED_KEYS,
)

_OPEN_CLIP_LAYER = (
    ("ln_1", "SelfAttentionBlock.LayerNorm"),
    ("attn.out_proj", "SelfAttentionBlock.SelfAttention.Linear"),
    ("ln_2", "FeedForwardBlock.LayerNorm"),
    ("mlp.c_fc", "FeedForwardBlock.Linear_1"),
    ("mlp.c_proj", "FeedForwardBlock.Linear_2"),
)
_OPEN_CLIP_QKV = (
    ("q", "SelfAttentionBlock.SelfAttention.Distribute.Linear_1"),
    ("k", "SelfAttentionBlock.SelfAttention.Distribute.Linear_2"),
    ("v", "SelfAttentionBlock.SelfAttention.Distribute.Linear_3"),
)


def open_clip_text_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's tensors as `open_clip_text_mapping` reads them, without copying any.

    Each fused attention projection `transformer.resblocks.N.attn.in_proj_weight` (and `in_proj_bias`) becomes its
    three thirds `...in_proj_weight[q]`, `[k]` and `[v]` (views), and `text_projection`, which OpenCLIP multiplies
    from the right (`x @ text_projection`), becomes `text_projection.T`, the weight of a linear layer (a view).
    Other keys are kept as they are.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            for (name, _), third in zip(_OPEN_CLIP_QKV, tensor.chunk(3)):
                converted[f"{key}[{name}]"] = third
        elif key == "text_projection":
            converted["text_projection.T"] = tensor.t()
        else:
            converted[key] = tensor
    return converted


def open_clip_text_mapping(config: CLIPTextEncoderConfig = CLIP_TEXT_G) -> dict[str, str]:
    """OpenCLIP text tower key, as `open_clip_text_tensors` gives them -> `CLIPTextEncoderL` state_dict key, for
    the encoder `config` describes (e.g. `CLIPTextEncoderG`, from `conditioner.embedders.1.model.*` of SDXL's
    single files). Keys in `OPEN_CLIP_TEXT_IGNORED_KEYS` are not mapped."""
    paths = _our_paths(config)
    mapping = {
        "token_embedding.weight": "Sum.TokenEncoder.weight",
        "positional_embedding": "Sum.PositionalEncoder.weight",
    }
    for index, ours in enumerate(paths.layers):
        block = f"transformer.resblocks.{index}"
        for param in ("weight", "bias"):
            for theirs_layer, our_layer in _OPEN_CLIP_LAYER:
                mapping[f"{block}.{theirs_layer}.{param}"] = f"{ours}.{our_layer}.{param}"
            for name, our_layer in _OPEN_CLIP_QKV:
                mapping[f"{block}.attn.in_proj_{param}[{name}]"] = f"{ours}.{our_layer}.{param}"
    for param in ("weight", "bias"):
        mapping[f"ln_final.{param}"] = f"{paths.final_norm}.{param}"
    if paths.projection is not None:
        mapping["text_projection.T"] = f"{paths.projection}.weight"
    return mapping


_PENULTIMATE = "penultimate_and_pooled"

SDXL_TEXT_ENCODER_FORMAT = replace(
    TEXT_ENCODER_FORMAT,
    config_from_diffusers=partial(clip_text_config_from_transformers, output=_PENULTIMATE),
    single_file_prefix="conditioner.embedders.0.transformer.",
    single_file_config=partial(clip_text_config_from_ldm, output=_PENULTIMATE),
)
"""SDXL's first text encoder (CLIP ViT-L/14, its penultimate hidden states): the `text_encoder/` folder of a diffusers
repository, or `conditioner.embedders.0.transformer.*` in an original single file. Load it with
`load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, ...)` or `load_single_file_component(...)`."""

SDXL_TEXT_ENCODER_2_FORMAT = ComponentFormat(
    name="text_encoder_2",
    subfolder="text_encoder_2",
    weight_stems=("model", "pytorch_model"),
    config_class=CLIPTextEncoderConfig,
    config_from_diffusers=partial(clip_text_config_from_transformers, output=_PENULTIMATE),
    diffusers_mapping=_transformers_mapping,
    single_file_prefix="conditioner.embedders.1.model.",
    single_file_mapping=open_clip_text_mapping,
    single_file_config=clip_text_config_from_open_clip,
    ignored_keys=CLIP_TEXT_IGNORED_KEYS | OPEN_CLIP_TEXT_IGNORED_KEYS,
    single_file_tensors=open_clip_text_tensors,
)
"""SDXL's second text encoder (OpenCLIP ViT-bigG/14, `CLIPTextEncoderG`): the `text_encoder_2/` folder of a diffusers
repository (a transformers `CLIPTextModelWithProjection`), or `conditioner.embedders.1.model.*` in an original single
file (OpenCLIP's layout)."""
