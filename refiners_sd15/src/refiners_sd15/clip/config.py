"""`CLIPTextEncoderConfig`, the shape of a CLIP text transformer and what it outputs, with the values of CLIP ViT-L/14
(SD1.5's text encoder) and OpenCLIP ViT-bigG/14 (SDXL's second one); read from a transformers `config.json` or from the
tensors of an original checkpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from refiners_core.state_dicts import shape_of
from refiners_sd15.config_values import check_fields, positive_int, positive_number

CLIPTextOutput = Literal["last_hidden_state", "penultimate_and_pooled"]


@dataclass(frozen=True, kw_only=True)
class CLIPTextEncoderConfig:
    """The shape of a CLIP text transformer: width, depth, heads, feed-forward width, positions and vocabulary, and
    which of its hidden states the encoder returns.

    `use_quick_gelu` picks QuickGeLU (`x * sigmoid(1.702 x)`, OpenAI's CLIP) in the feed-forward blocks, else the
    exact GeLU (OpenCLIP). E.g. OpenCLIP ViT-H of SD2: `embedding_dim=1024, num_layers=23, num_attention_heads=16,
    feedforward_dim=4096, use_quick_gelu=False`.

    `output` is what the encoder returns for token ids `(B, L)`:

    - `"last_hidden_state"` (SD1.5): the last layer's output after the final layer norm, `(B, L, embedding_dim)`,
      transformers' `last_hidden_state`;
    - `"penultimate_and_pooled"` (SDXL): a tuple of the penultimate layer's output, without the final norm
      (`(B, L, embedding_dim)`, transformers' `hidden_states[-2]`), and the pooled embedding: the last layer's output
      after the final norm, at each sequence's end-of-text token, times the text projection when `projection_dim`
      is set (`(B, projection_dim)`, transformers' `CLIPTextModelWithProjection` `text_embeds`), else as it is
      (`(B, embedding_dim)`, `CLIPTextModel`'s `pooler_output`).

    `end_of_text_token_id` tells where the pooled embedding is taken: at the first position of that id, or, when
    None, at the position of the largest id, as transformers does for the published CLIP configs (their
    `eos_token_id` is 2). Both are the end-of-text token of `CLIPTokenizer`'s sequences, the largest id of CLIP's
    vocabulary; they differ for ids beyond the vocabulary (textual inversion tokens) or other vocabularies.

    Raises ValueError naming the field for a size that is not a positive integer (`layer_norm_eps`: a positive
    number), if `num_attention_heads` does not divide `embedding_dim`, or if `projection_dim` or
    `end_of_text_token_id` is given for an output without a pooled embedding.
    """

    embedding_dim: int
    num_layers: int
    num_attention_heads: int
    feedforward_dim: int
    max_sequence_length: int = 77
    vocabulary_size: int = 49408
    layer_norm_eps: float = 1e-5
    use_quick_gelu: bool = True
    output: CLIPTextOutput = "last_hidden_state"
    projection_dim: int | None = None
    end_of_text_token_id: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.embedding_dim % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextEncoderConfig: embedding_dim={self.embedding_dim} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.output not in ("last_hidden_state", "penultimate_and_pooled"):
            raise ValueError(
                f"CLIPTextEncoderConfig: output={self.output!r}, expected 'last_hidden_state' or "
                "'penultimate_and_pooled'"
            )
        if self.output == "last_hidden_state":
            for field in ("projection_dim", "end_of_text_token_id"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"CLIPTextEncoderConfig: {field}={getattr(self, field)} describes the pooled embedding, "
                        "which only output='penultimate_and_pooled' returns"
                    )


CLIP_TEXT_L = CLIPTextEncoderConfig(embedding_dim=768, num_layers=12, num_attention_heads=12, feedforward_dim=3072)
"""OpenAI's CLIP ViT-L/14 text encoder, Stable Diffusion 1.5's (`text_encoder/config.json`)."""

CLIP_TEXT_L_PENULTIMATE = replace(CLIP_TEXT_L, output="penultimate_and_pooled")
"""CLIP ViT-L/14 as SDXL uses it (`text_encoder/`): its penultimate hidden states (and its unprojected pooled
embedding, which SDXL does not use)."""

CLIP_TEXT_G = CLIPTextEncoderConfig(
    embedding_dim=1280,
    num_layers=32,
    num_attention_heads=20,
    feedforward_dim=5120,
    use_quick_gelu=False,
    output="penultimate_and_pooled",
    projection_dim=1280,
)
"""OpenCLIP ViT-bigG/14's text encoder as SDXL uses it (`text_encoder_2/config.json` of
stabilityai/stable-diffusion-xl-base-1.0, a `CLIPTextModelWithProjection`): penultimate hidden states and the
projected pooled embedding."""


_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
    "eos_token_id": 49407,
}
"""transformers' `CLIPTextConfig` defaults, which apply to the fields a config.json leaves out."""

_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
"""`hidden_act` -> `use_quick_gelu`."""

_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
"""transformers class -> whether it has a text projection."""

_LEGACY_EOS_TOKEN_ID = 2
"""The `eos_token_id` of the published CLIP configs, for which transformers pools at the largest id."""


def clip_text_config_from_transformers(
    config: dict[str, Any], *, output: CLIPTextOutput = "last_hidden_state"
) -> CLIPTextEncoderConfig:
    """The `CLIPTextEncoderConfig` of a transformers `CLIPTextModel` or `CLIPTextModelWithProjection` config.json
    (e.g. `text_encoder/`, or SDXL's `text_encoder_2/`), for the encoder returning `output`.

    Fields left out take transformers' `CLIPTextConfig` defaults, as transformers itself would. Fields that do not
    change the output are ignored: dropouts, initialisation, the other special token ids, and for
    `output="last_hidden_state"` `projection_dim` and `eos_token_id` too. With `output="penultimate_and_pooled"`,
    `projection_dim` is read for a `CLIPTextModelWithProjection` (a `CLIPTextModel` has no projection), and
    `eos_token_id` gives `end_of_text_token_id` (None for the published configs' 2: pooling at the largest id).

    Raises ValueError naming the field for a configuration `CLIPTextEncoderL` does not implement: another model
    type or architecture, a `CLIPTextModelWithProjection` read for its last hidden state only (its projection would
    go unused), an activation other than `quick_gelu` or `gelu`, a width not divisible by the number of heads, or a
    size that is not a positive integer.
    """
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        hint = ": pass its 'text_config'" if model_type == "clip" else ""
        raise ValueError(f"CLIP text config: 'model_type' is {model_type!r}, expected 'clip_text_model'{hint}")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if (
        not isinstance(architectures, list)
        or len(architectures) != 1  # pyright: ignore[reportUnknownArgumentType]
        or not isinstance(architectures[0], str)
        or architectures[0] not in _ARCHITECTURES
    ):
        supported = " or ".join(repr([name]) for name in _ARCHITECTURES)
        raise ValueError(f"CLIP text config: 'architectures' is {architectures!r}, supported: {supported}")
    has_projection = _ARCHITECTURES[architectures[0]]
    if has_projection and output == "last_hidden_state":
        raise ValueError(
            f"CLIP text config: 'architectures' is {architectures!r}, whose text projection gives the pooled "
            "embedding: read it with output='penultimate_and_pooled' (CLIPTextEncoderG), not for the last hidden "
            "state only"
        )
    fields = _TRANSFORMERS_DEFAULTS | {field: config[field] for field in _TRANSFORMERS_DEFAULTS if field in config}
    hidden_act = fields["hidden_act"]
    if not isinstance(hidden_act, str) or hidden_act not in _ACTIVATIONS:
        supported = " or ".join(repr(name) for name in _ACTIVATIONS)
        raise ValueError(f"CLIP text config: 'hidden_act' is {hidden_act!r}, supported: {supported}")
    sizes = {
        field: positive_int(field, fields[field])
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
    pooled = output == "penultimate_and_pooled"
    projection_dim = positive_int("projection_dim", fields["projection_dim"]) if pooled and has_projection else None
    end_of_text_token_id = None
    if pooled:
        eos_token_id = fields["eos_token_id"]
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"CLIP text config: 'eos_token_id' is {eos_token_id!r}, expected a token id")
        end_of_text_token_id = None if eos_token_id == _LEGACY_EOS_TOKEN_ID else eos_token_id
    return CLIPTextEncoderConfig(
        embedding_dim=sizes["hidden_size"],
        num_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        feedforward_dim=sizes["intermediate_size"],
        max_sequence_length=sizes["max_position_embeddings"],
        vocabulary_size=sizes["vocab_size"],
        layer_norm_eps=positive_number("layer_norm_eps", fields["layer_norm_eps"]),
        use_quick_gelu=_ACTIVATIONS[hidden_act],
        output=output,
        projection_dim=projection_dim,
        end_of_text_token_id=end_of_text_token_id,
    )


def clip_text_config_from_ldm(
    tensors: Mapping[str, torch.Tensor], *, output: CLIPTextOutput = "last_hidden_state"
) -> CLIPTextEncoderConfig:
    """The `CLIPTextEncoderConfig` read from the shapes of an original checkpoint's text encoder tensors (OpenAI's
    CLIP, with QuickGeLU), for the encoder returning `output`.

    Keys are without the `cond_stage_model.transformer.` prefix (SD1.5) or `conditioner.embedders.0.transformer.`
    (SDXL). Heads are not stored in the weights: CLIP uses heads of 64 dimensions. Raises ValueError for a tensor
    set that is not a CLIP text encoder, naming the key a size is read from when it is missing or of the wrong
    shape.
    """
    embedding_key = "text_model.embeddings.token_embedding.weight"
    if embedding_key not in tensors:
        raise ValueError(f"not a CLIP text encoder checkpoint: no '{embedding_key}'")
    vocabulary_size, embedding_dim = shape_of(tensors, embedding_key, 2, "vocabulary_size and embedding_dim")
    layers = {
        int(match.group(1)) for key in tensors if (match := re.match(r"text_model\.encoder\.layers\.(\d+)\.", key))
    }
    if not layers:
        raise ValueError("no 'text_model.encoder.layers.N.*' keys, from which num_layers is read")
    feedforward = shape_of(tensors, "text_model.encoder.layers.0.mlp.fc1.weight", 2, "feedforward_dim")
    positions = shape_of(tensors, "text_model.embeddings.position_embedding.weight", 2, "max_sequence_length")
    return CLIPTextEncoderConfig(
        embedding_dim=embedding_dim,
        num_layers=len(layers),
        num_attention_heads=max(1, embedding_dim // 64),
        feedforward_dim=feedforward[0],
        max_sequence_length=positions[0],
        vocabulary_size=vocabulary_size,
        output=output,
    )


def clip_text_config_from_open_clip(tensors: Mapping[str, torch.Tensor]) -> CLIPTextEncoderConfig:
    """The `CLIPTextEncoderConfig` of an OpenCLIP text tower read from its tensors' shapes, as SDXL uses it (exact
    GeLU, penultimate hidden states and the pooled embedding, at the largest token id as OpenCLIP pools).

    Keys are those of OpenCLIP's `CLIP` text tower (`token_embedding.weight`, `transformer.resblocks.0.attn.
    in_proj_weight`, `text_projection`...), e.g. after the `conditioner.embedders.1.model.` prefix of SDXL's single
    files. Heads are not stored in the weights: OpenCLIP's text towers use heads of 64 dimensions. Raises
    ValueError for a tensor set that is not an OpenCLIP text tower.
    """
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in tensors:
            raise ValueError(f"not an OpenCLIP text tower: no '{key}'")
    vocabulary_size, embedding_dim = tensors["token_embedding.weight"].shape
    layers = {int(match.group(1)) for key in tensors if (match := re.match(r"transformer\.resblocks\.(\d+)\.", key))}
    projection = tensors.get("text_projection")
    return CLIPTextEncoderConfig(
        embedding_dim=embedding_dim,
        num_layers=len(layers),
        num_attention_heads=max(1, embedding_dim // 64),
        feedforward_dim=tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        max_sequence_length=tensors["positional_embedding"].shape[0],
        vocabulary_size=vocabulary_size,
        use_quick_gelu=False,
        output="penultimate_and_pooled",
        projection_dim=None if projection is None else projection.shape[-1],
    )
