"""IP-Adapter weights as released: `image_proj.*` (the image projection) and `ip_adapter.*` (the image keys and
values of each cross-attention), told apart by their keys and shapes.

`KINDS` lists the released architectures. Two releases share each of the SD1.5 shapes, so a file of these shapes is
one or the other: `ip-adapter_sd15` and `ip-adapter_sd15_light` (a linear projection of the image embedding to 4
tokens), `ip-adapter-plus_sd15` and `ip-adapter-plus-face_sd15` (a Perceiver resampler over the penultimate hidden
states, 16 tokens); they differ in their training only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from refiners_core.weights import WeightsError

Projection = Literal["linear", "perceiver"]


@dataclass(frozen=True)
class IPAdapterKind:
    """A released IP-Adapter architecture: its projection, the UNet it adapts and the image encoder it reads."""

    names: tuple[str, ...]
    projection: Projection
    unet: Literal["sd15", "sdxl"]
    cross_attention_dim: int
    image_embedding_dim: int
    encoder: str

    @property
    def name(self) -> str:
        """The release names of this architecture, e.g. `ip-adapter_sd15 / ip-adapter_sd15_light`."""
        return " / ".join(self.names)


KINDS = (
    IPAdapterKind(("ip-adapter_sd15", "ip-adapter_sd15_light"), "linear", "sd15", 768, 1024, "ViT-H/14"),
    IPAdapterKind(("ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"), "perceiver", "sd15", 768, 1280, "ViT-H/14"),
    IPAdapterKind(("ip-adapter_sdxl",), "linear", "sdxl", 2048, 1280, "ViT-bigG/14"),
    IPAdapterKind(("ip-adapter_sdxl_vit-h",), "linear", "sdxl", 2048, 1024, "ViT-H/14"),
    IPAdapterKind(("ip-adapter-plus_sdxl_vit-h",), "perceiver", "sdxl", 2048, 1280, "ViT-H/14"),
)
"""The released IP-Adapter architectures (h94/IP-Adapter), by projection, cross-attention and image embedding widths.
`image_embedding_dim` is the encoder's `projection_dim` for a linear projection, its `embedding_dim` (the width of
its penultimate hidden states) for a Perceiver resampler."""

_UNSUPPORTED = {
    "image_proj.proj.3.weight": "IP-Adapter Full Face (ip-adapter-full-face_sd15)",
    "image_proj.perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
    "image_proj.proj.0.weight": "IP-Adapter FaceID",
}


@dataclass(frozen=True)
class PerceiverShape:
    """The sizes of a Perceiver resampler, read from its weights."""

    hidden_dim: int
    num_queries: int
    depth: int
    inner_dim: int
    feedforward_dim: int

    @property
    def num_heads(self) -> int:
        """Heads of 64 dimensions, as in the released resamplers."""
        return self.inner_dim // 64


@dataclass(frozen=True)
class IPAdapterWeights:
    """The shape of IP-Adapter weights: projection, widths, tokens per image, and the image keys and values of each
    cross-attention (`layers[i]` is `(out_features, in_features)` of the i-th layer's `to_k_ip`)."""

    source: str
    projection: Projection
    image_embedding_dim: int
    cross_attention_dim: int
    num_tokens: int
    layers: tuple[tuple[int, int], ...]
    perceiver: PerceiverShape | None = None

    @property
    def kind(self) -> IPAdapterKind | None:
        """The released architecture of these widths, or None (e.g. a small one made for tests)."""
        for kind in KINDS:
            if (kind.projection, kind.cross_attention_dim, kind.image_embedding_dim) == (
                self.projection,
                self.cross_attention_dim,
                self.image_embedding_dim,
            ):
                return kind
        return None

    def describe(self) -> str:
        """What these weights are: the kind's release names, or the widths."""
        kind = self.kind
        if kind is not None:
            return f"{kind.name} weights ({kind.unet}, {kind.encoder})"
        return (
            f"IP-Adapter weights ({self.projection} projection, cross_attention_dim={self.cross_attention_dim}, "
            f"image features of {self.image_embedding_dim})"
        )


def _shape(tensors: Mapping[str, torch.Tensor], source: str, key: str, ndim: int) -> tuple[int, ...]:
    tensor = tensors.get(key)
    if tensor is None:
        raise WeightsError(f"{source}: no '{key}'")
    if tensor.dim() != ndim or not all(tensor.shape):
        raise WeightsError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, expected {ndim} non-empty dimensions")
    return tuple(tensor.shape)


def read_ip_adapter_weights(tensors: Mapping[str, torch.Tensor], source: str) -> IPAdapterWeights:
    """What IP-Adapter weights `tensors` (keys `image_proj.*` and `ip_adapter.*`, as the released `.safetensors` hold
    them and the `.bin` files once flattened) are, from their keys and shapes.

    Raises WeightsError naming `source` and the key for tensors that are not IP-Adapter weights (naming a few of
    their keys), an IP-Adapter variant this package does not implement (Full Face, FaceID), a missing key or a shape
    that does not fit the others.
    """
    if not any(key.startswith("image_proj.") for key in tensors) or not any(
        key.startswith("ip_adapter.") for key in tensors
    ):
        shown = ", ".join(f"'{key}'" for key in list(tensors)[:3]) or "no tensors"
        raise WeightsError(
            f"{source}: not IP-Adapter weights: expected 'image_proj.*' and 'ip_adapter.*' keys, found {shown}"
            + (" ..." if len(tensors) > 3 else "")
        )
    for key, variant in _UNSUPPORTED.items():
        if key in tensors:
            supported = ", ".join(name for kind in KINDS for name in kind.names)
            raise WeightsError(f"{source}: '{key}': {variant} is not supported (supported: {supported})")
    layers = _layers(tensors, source)
    if "image_proj.proj.weight" in tensors:
        out_features, image_embedding_dim = _shape(tensors, source, "image_proj.proj.weight", 2)
        (cross_attention_dim,) = _shape(tensors, source, "image_proj.norm.weight", 1)
        if out_features % cross_attention_dim:
            raise WeightsError(
                f"{source}: 'image_proj.proj.weight' has {out_features} outputs, not a multiple of the "
                f"{cross_attention_dim} of 'image_proj.norm.weight'"
            )
        return IPAdapterWeights(
            source, "linear", image_embedding_dim, cross_attention_dim, out_features // cross_attention_dim, layers
        )
    if "image_proj.latents" not in tensors:
        raise WeightsError(
            f"{source}: unknown image projection: neither 'image_proj.proj.weight' (IP-Adapter) nor "
            "'image_proj.latents' (IP-Adapter Plus)"
        )
    _, num_queries, hidden_dim = _shape(tensors, source, "image_proj.latents", 3)
    image_embedding_dim = _shape(tensors, source, "image_proj.proj_in.weight", 2)[1]
    cross_attention_dim = _shape(tensors, source, "image_proj.proj_out.weight", 2)[0]
    depth = len({int(m.group(1)) for key in tensors if (m := re.match(r"image_proj\.layers\.(\d+)\.", key))})
    inner_dim = _shape(tensors, source, "image_proj.layers.0.0.to_q.weight", 2)[0]
    if inner_dim % 64:
        raise WeightsError(
            f"{source}: 'image_proj.layers.0.0.to_q.weight' has {inner_dim} outputs, expected heads of 64 dimensions"
        )
    feedforward_dim = _shape(tensors, source, "image_proj.layers.0.1.1.weight", 2)[0]
    shape = PerceiverShape(hidden_dim, num_queries, depth, inner_dim, feedforward_dim)
    return IPAdapterWeights(
        source, "perceiver", image_embedding_dim, cross_attention_dim, num_queries, layers, perceiver=shape
    )


def _layers(tensors: Mapping[str, torch.Tensor], source: str) -> tuple[tuple[int, int], ...]:
    """The `(out, in)` shape of each layer's `to_k_ip`, layers numbered 1, 3, 5... as released."""
    ids = sorted({int(m.group(1)) for key in tensors if (m := re.match(r"ip_adapter\.(\d+)\.", key))})
    expected = list(range(1, 2 * len(ids), 2))
    if ids != expected:
        odd = next(index for index, wanted in zip(ids, expected) if index != wanted)
        raise WeightsError(
            f"{source}: the 'ip_adapter.N.*' layers are numbered {ids[:4]}..., expected 1, 3, 5...: 'ip_adapter.{odd}' "
            "is out of place"
        )
    return tuple(_shape(tensors, source, f"ip_adapter.{index}.to_k_ip.weight", 2) for index in ids)  # type: ignore[misc]
