"""`IPAdapter.from_pretrained`: the released weights checked against the UNet and the image encoder, then loaded.

The key mapping is derived from the layer paths of the built image projection and image cross-attentions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import refiners_core.fluxion as fl
from refiners_clip_vision import CLIPImageEncoder, CLIPImageEncoderConfig, clip_image_config_from_transformers
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import WeightsError, load_tensors, resolve_path
from refiners_ip_adapter.attention import KEY_WEIGHT, VALUE_WEIGHT
from refiners_ip_adapter.image_proj import PerceiverBlock, PerceiverResampler
from refiners_ip_adapter.unets import text_cross_attentions, unet_family
from refiners_ip_adapter.weights import IPAdapterWeights, read_ip_adapter_weights

if TYPE_CHECKING:
    from refiners_ip_adapter.adapter import IPAdapter

ENCODER_FOLDER = "image_encoder"
"""The folder of the image encoder in IP-Adapter releases, beside the weights (or beside their folder)."""

_PERCEIVER_ATTENTION = "Residual_1.PerceiverAttention"
_PERCEIVER_BLOCK = (
    ("0.norm1", f"{_PERCEIVER_ATTENTION}.Parallel.Chain.LayerNorm"),
    ("0.norm2", f"{_PERCEIVER_ATTENTION}.Parallel.LayerNorm"),
    ("0.to_q", f"{_PERCEIVER_ATTENTION}.Distribute.Linear_1"),
    ("0.to_kv:keys", f"{_PERCEIVER_ATTENTION}.Distribute.Linear_2"),
    ("0.to_kv:values", f"{_PERCEIVER_ATTENTION}.Distribute.Linear_3"),
    ("0.to_out", f"{_PERCEIVER_ATTENTION}.Linear"),
    ("1.0", "Residual_2.LayerNorm"),
    ("1.1", "Residual_2.Linear_1"),
    ("1.3", "Residual_2.Linear_2"),
)


def image_proj_mapping(weights: IPAdapterWeights, image_proj: fl.Chain) -> dict[str, str]:
    """Released `image_proj.*` key -> key of our image projection. A Perceiver's `to_kv.weight` is split in two,
    `to_kv:keys.weight` and `to_kv:values.weight` (see `split_key_values`)."""
    if weights.perceiver is None:
        pairs = (("proj", "Linear"), ("norm", "LayerNorm"))
        return {f"image_proj.{theirs}.{s}": f"{ours}.{s}" for theirs, ours in pairs for s in ("weight", "bias")}
    assert isinstance(image_proj, PerceiverResampler)
    mapping = {"image_proj.latents": "Parameter.weight"}
    for theirs, ours in (("proj_in", "Linear_1"), ("proj_out", "Linear_2"), ("norm_out", "LayerNorm")):
        mapping |= {f"image_proj.{theirs}.{suffix}": f"{ours}.{suffix}" for suffix in ("weight", "bias")}
    for index, block in enumerate(image_proj.layers(PerceiverBlock)):
        path = block.get_path(image_proj)
        for theirs, ours in _PERCEIVER_BLOCK:
            mapping[f"image_proj.layers.{index}.{theirs}.weight"] = f"{path}.{ours}.weight"
            if "norm" in theirs or theirs == "1.0":
                mapping[f"image_proj.layers.{index}.{theirs}.bias"] = f"{path}.{ours}.bias"
    return mapping


def split_key_values(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with each Perceiver `to_kv.weight` split into its keys and values halves, and the `(1, Q, D)`
    latents as `(Q, D)`, as our layers hold them."""
    split: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith("image_proj.layers.") and key.endswith(".to_kv.weight") and tensor.dim() == 2:
            keys, values = tensor.chunk(2, dim=0)
            stem = key.removesuffix(".weight")
            split[f"{stem}:keys.weight"], split[f"{stem}:values.weight"] = keys, values
        elif key == "image_proj.latents" and tensor.dim() == 3 and tensor.shape[0] == 1:
            split[key] = tensor[0]
        else:
            split[key] = tensor
    return split


def load_ip_adapter(
    cls: type[IPAdapter],
    unet: fl.Chain,
    weights: str | Path,
    *,
    image_encoder: str | Path | CLIPImageEncoder | None,
    scale: float,
) -> IPAdapter:
    family = unet_family(unet)
    path = Path(weights).expanduser()
    tensors = load_tensors(path)
    source = str(path)
    shape = read_ip_adapter_weights(tensors, source)
    attentions = text_cross_attentions(unet)
    _check_fits_unet(shape, unet, family, attentions)
    encoder_config, encoder_source = _encoder_config(image_encoder, path)
    _check_fits_encoder(shape, encoder_config, encoder_source)
    device, dtype = unet.device, unet.dtype
    # The IP-Adapter's own weights are checked and loaded first, then the image encoder's (the larger file).
    placeholder = CLIPImageEncoder(encoder_config, device="meta")
    adapter = cls(unet, shape, placeholder, attentions, scale=scale, device="meta", dtype=dtype)
    prepared = split_key_values(tensors)
    projection = {key: value for key, value in prepared.items() if key.startswith("image_proj.")}
    load_state_dict_checked(
        adapter.image_proj,
        projection,
        source=source,
        mapping=image_proj_mapping(shape, adapter.image_proj),
        assign_to_device=device,
    )
    layers = {key: value for key, value in prepared.items() if key.startswith("ip_adapter.")}
    mapping: dict[str, str] = {}
    for index in range(len(attentions)):
        mapping[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = f"{index}.{KEY_WEIGHT}"
        mapping[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = f"{index}.{VALUE_WEIGHT}"
    load_state_dict_checked(adapter.cross_attentions, layers, source=source, mapping=mapping, assign_to_device=device)
    if isinstance(image_encoder, CLIPImageEncoder):
        adapter.image_encoder = image_encoder
    else:
        adapter.image_encoder = CLIPImageEncoder.from_pretrained(str(encoder_source), device=device, dtype=dtype)
    return adapter


def _check_fits_unet(shape: IPAdapterWeights, unet: fl.Chain, family: str, attentions: list[fl.Attention]) -> None:
    where = f"the {type(unet).__name__} at `{unet.get_path()}`"
    context_dim = attentions[0].key_embedding_dim if attentions else None
    kind = shape.kind
    if kind is not None and kind.unet != family:
        raise WeightsError(
            f"{shape.source}: {shape.describe()} are for {kind.unet.upper()}, they do not fit {where} "
            f"({family.upper()}, cross_attention_dim={context_dim})"
        )
    if shape.cross_attention_dim != context_dim:
        raise WeightsError(
            f"{shape.source}: {shape.describe()} project images to cross_attention_dim="
            f"{shape.cross_attention_dim}, {where} has cross_attention_dim={context_dim}"
        )
    if len(shape.layers) != len(attentions):
        raise WeightsError(
            f"{shape.source}: {shape.describe()} have 'ip_adapter.*' weights for {len(shape.layers)} "
            f"cross-attention layers, {where} has {len(attentions)}"
        )
    for index, (layer, attention) in enumerate(zip(shape.layers, attentions)):
        if layer != (attention.inner_dim, context_dim):
            raise WeightsError(
                f"{shape.source}: 'ip_adapter.{2 * index + 1}.to_k_ip.weight' has shape {layer}, the cross-attention "
                f"`{attention.get_path()}` expects {(attention.inner_dim, context_dim)}"
            )


def image_encoder_beside(weights: Path) -> Path:
    """The `image_encoder/` folder (with a `config.json`) beside `weights`, or else beside their folder, as
    h94/IP-Adapter lays them out. Raises FileNotFoundError naming both places."""
    candidates = (weights.parent / ENCODER_FOLDER, weights.parent.parent / ENCODER_FOLDER)
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"{weights}: no image encoder given, and no {ENCODER_FOLDER}/ folder with a config.json beside it "
        f"({candidates[0]}) or beside its folder ({candidates[1]}): pass the image encoder's folder"
    )


def _encoder_config(
    image_encoder: str | Path | CLIPImageEncoder | None, weights: Path
) -> tuple[CLIPImageEncoderConfig, Path | str]:
    """The image encoder's config and where it is, read before any encoder weight."""
    if isinstance(image_encoder, CLIPImageEncoder):
        return image_encoder.config, "the given CLIPImageEncoder"
    if image_encoder is None:
        image_encoder = image_encoder_beside(weights)
    config_path = resolve_path(str(image_encoder), "config.json")
    try:
        config = clip_image_config_from_transformers(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise WeightsError(f"{config_path}: {error}") from None
    return config, config_path.parent


def _check_fits_encoder(shape: IPAdapterWeights, config: CLIPImageEncoderConfig, where: Path | str) -> None:
    if shape.perceiver is None:
        width, what = config.projection_dim, "projected image embeddings (projection_dim)"
        key = "image_proj.proj.weight"
    else:
        width, what = config.embedding_dim, "penultimate hidden states (hidden_size)"
        key = "image_proj.proj_in.weight"
    if width != shape.image_embedding_dim:
        kind = shape.kind
        wanted = f" ({kind.encoder})" if kind is not None else ""
        raise WeightsError(
            f"{shape.source}: '{key}' reads image features of {shape.image_embedding_dim}{wanted}, the image encoder "
            f"{where} gives {what} of {width}: pass the image encoder these weights were trained with"
        )
