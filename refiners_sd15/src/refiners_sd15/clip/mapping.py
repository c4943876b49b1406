"""Key mappings from CLIP text encoder weight files to `CLIPTextEncoderL`.

Keys of the published files are those of transformers' `CLIPTextModel` as transformers 4.x writes them
(`text_model.encoder.layers.0.self_attn.q_proj.weight`): the `text_encoder/` folder of a diffusers repository and,
after the `cond_stage_model.transformer.` prefix, the original single-file checkpoints. transformers 5.6 and later
write the same keys without `text_model.`: pass `prefix=""` for files saved by them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from refiners_sd15.clip.config import (
    CLIP_TEXT_L,
    CLIPTextEncoderConfig,
    clip_text_config_from_ldm,
    clip_text_config_from_transformers,
)
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


def transformers_clip_text_mapping(
    config: CLIPTextEncoderConfig = CLIP_TEXT_L, *, prefix: str = "text_model."
) -> dict[str, str]:
    """transformers `CLIPTextModel` state_dict key -> `CLIPTextEncoderL` state_dict key, for the encoder `config`
    describes (its `num_layers` shape the mapping).

    `prefix` starts every file key: `"text_model."` in files written by transformers 4.x (every published SD1.5
    checkpoint), `""` in files written by transformers >= 5.6. Keys in `CLIP_TEXT_IGNORED_KEYS` are not mapped:
    pass them as `ignore` to `load_state_dict_checked`.
    """
    return {f"{prefix}{theirs}": ours for theirs, ours in _keys(config.num_layers)}


def ldm_clip_text_mapping(config: CLIPTextEncoderConfig = CLIP_TEXT_L) -> dict[str, str]:
    """Original (CompVis/ldm single-file) text encoder key -> `CLIPTextEncoderL` state_dict key.

    Keys are those of the `cond_stage_model.transformer.` part of a checkpoint, without that prefix: the
    transformers 4.x keys (`text_model.encoder.layers.0...`), as diffusers' `convert_ldm_clip_checkpoint` reads them.
    """
    return transformers_clip_text_mapping(config, prefix="text_model.")


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
