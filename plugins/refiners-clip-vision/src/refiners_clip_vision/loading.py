"""Reading a transformers `CLIPVisionModelWithProjection` folder into a `CLIPImageEncoder`: its config, and the key
mapping of its weights, derived from the layer paths of the built encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refiners_clip_vision.config import CLIPImageEncoderConfig, clip_image_config_from_transformers
from refiners_core.fluxion import Device
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import NotInHubCacheError, WeightsError, load_tensors, resolve_path

if TYPE_CHECKING:
    from refiners_clip_vision.encoder import CLIPImageEncoder

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weight files of a transformers folder, in the order they are looked for."""

IGNORED_KEYS = frozenset({"vision_model.embeddings.position_ids"})
"""Keys some files hold that carry nothing the encoder needs (the `0..256` position ids buffer)."""

_LAYER = (
    ("layer_norm1", "SelfAttentionBlock.LayerNorm"),
    ("self_attn.q_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_1"),
    ("self_attn.k_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_2"),
    ("self_attn.v_proj", "SelfAttentionBlock.SelfAttention.Distribute.Linear_3"),
    ("self_attn.out_proj", "SelfAttentionBlock.SelfAttention.Linear"),
    ("layer_norm2", "FeedForwardBlock.LayerNorm"),
    ("mlp.fc1", "FeedForwardBlock.Linear_1"),
    ("mlp.fc2", "FeedForwardBlock.Linear_2"),
)


def transformers_clip_image_mapping(config: CLIPImageEncoderConfig) -> dict[str, str]:
    """transformers `CLIPVisionModelWithProjection` state dict key -> `CLIPImageEncoder` state dict key, for the
    encoder `config` describes (read from the layer paths of an encoder built on the meta device)."""
    from refiners_clip_vision.encoder import CLIPImageEncoder, TransformerLayer

    encoder = CLIPImageEncoder(config, device="meta")
    prefix = "vision_model."
    mapping = {
        f"{prefix}embeddings.class_embedding": "ViTEmbeddings.Concatenate.Parameter.weight",
        f"{prefix}embeddings.patch_embedding.weight": "ViTEmbeddings.Concatenate.PatchEncoder.Conv2d.weight",
        f"{prefix}embeddings.position_embedding.weight": "ViTEmbeddings.PositionalEncoder.weight",
        "visual_projection.weight": "Parallel.ImageEmbedding.Linear.weight",
    }
    for theirs, ours in (("pre_layrnorm", "LayerNorm"), ("post_layernorm", "Parallel.ImageEmbedding.LayerNorm")):
        mapping |= {f"{prefix}{theirs}.{suffix}": f"{ours}.{suffix}" for suffix in ("weight", "bias")}
    for index, layer in enumerate(encoder.layers(TransformerLayer)):
        path = layer.get_path(encoder)
        for theirs, ours in _LAYER:
            for suffix in ("weight", "bias"):
                mapping[f"{prefix}encoder.layers.{index}.{theirs}.{suffix}"] = f"{path}.{ours}.{suffix}"
    return mapping


def class_embedding_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The class embedding as our `(1, D)` parameter holds it (transformers stores a `(D,)` vector)."""
    key = "vision_model.embeddings.class_embedding"
    if key in tensors and tensors[key].dim() == 1:
        return {**tensors, key: tensors[key].unsqueeze(0)}
    return tensors


def load_clip_image_encoder(
    cls: type[CLIPImageEncoder],
    path_or_repo_id: str,
    *,
    subfolder: str | None,
    device: Device,
    dtype: torch.dtype | None,
) -> CLIPImageEncoder:
    """`CLIPImageEncoder.from_pretrained`: the config is checked before any weight is read, the weights are checked
    whole before the encoder (built on the meta device) takes them."""
    config_path = resolve_path(path_or_repo_id, "config.json", subfolder=subfolder)
    try:
        values: Any = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read {config_path} as JSON: {error}") from error
    if not isinstance(values, dict):
        raise WeightsError(f"{config_path}: expected a JSON object, got {type(values).__name__}")  # pyright: ignore[reportUnknownArgumentType]
    try:
        config = clip_image_config_from_transformers(values)  # pyright: ignore[reportUnknownArgumentType]
    except ValueError as error:
        raise WeightsError(f"{config_path}: {error}") from None
    weights = _weights_file(path_or_repo_id, subfolder, config_path.parent)
    tensors = class_embedding_tensors(load_tensors(weights))
    encoder = cls(config, device="meta", dtype=dtype)
    load_state_dict_checked(
        encoder,
        tensors,
        source=str(weights),
        mapping=transformers_clip_image_mapping(config),
        ignore=IGNORED_KEYS,
        assign_to_device=device or "cpu",
    )
    return encoder.eval()


def _weights_file(path_or_repo_id: str, subfolder: str | None, folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    missing: FileNotFoundError | None = None
    for name in WEIGHT_FILES:
        try:
            return resolve_path(path_or_repo_id, name, subfolder=subfolder)
        except NotInHubCacheError:
            raise
        except FileNotFoundError as error:
            missing = error
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {folder}") from missing
