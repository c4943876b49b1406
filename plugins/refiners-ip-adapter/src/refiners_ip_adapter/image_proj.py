"""The image projections of IP-Adapter: CLIP image features to the tokens the UNet's cross-attentions attend to.

- `ImageProjection` (IP-Adapter): the projected image embedding `(N, D)` to `num_tokens` tokens, `(N, T, C)`.
- `PerceiverResampler` (IP-Adapter Plus, arXiv:2204.14198's resampler): `num_queries` learned latents attend to the
  penultimate hidden states `(N, L, D)` of the image encoder, `(N, Q, C)`.
"""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_ip_adapter.weights import PerceiverShape

FEATURES_CONTEXT = "perceiver_resampler"
"""The resampler's context, holding the projected image features (key `features`) its attention layers read."""


class ImageProjection(fl.Chain):
    """`Linear -> (T, C) -> LayerNorm`: one image embedding to `num_tokens` tokens of `cross_attention_dim`."""

    def __init__(
        self,
        image_embedding_dim: int,
        cross_attention_dim: int,
        num_tokens: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Linear(image_embedding_dim, num_tokens * cross_attention_dim, device=device, dtype=dtype),
            fl.Reshape(num_tokens, cross_attention_dim),
            fl.LayerNorm(cross_attention_dim, device=device, dtype=dtype),
        )


class LatentsAndFeatures(fl.Module):
    """`(features, latents)` -> `(latents, features ‖ latents, features ‖ latents)`: the latents query the image
    features and themselves."""

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = torch.cat((features, latents), dim=-2)
        return latents, keys, keys


class PerceiverAttention(fl.Chain):
    """The latents (normalised) attend to the normalised image features and to themselves; no biases."""

    def __init__(self, shape: PerceiverShape, device: Device = None, dtype: torch.dtype | None = None) -> None:
        dim, inner = shape.hidden_dim, shape.inner_dim
        super().__init__(
            fl.Parallel(
                fl.Chain(fl.UseContext(FEATURES_CONTEXT, "features"), fl.LayerNorm(dim, device=device, dtype=dtype)),
                fl.LayerNorm(dim, device=device, dtype=dtype),
            ),
            LatentsAndFeatures(),
            fl.Distribute(
                fl.Linear(dim, inner, bias=False, device=device, dtype=dtype),
                fl.Linear(dim, inner, bias=False, device=device, dtype=dtype),
                fl.Linear(dim, inner, bias=False, device=device, dtype=dtype),
            ),
            fl.ScaledDotProductAttention(num_heads=shape.num_heads),
            fl.Linear(inner, dim, bias=False, device=device, dtype=dtype),
        )


class PerceiverBlock(fl.Chain):
    """Attention to the image features, then a feed-forward, each residual."""

    def __init__(self, shape: PerceiverShape, device: Device = None, dtype: torch.dtype | None = None) -> None:
        dim = shape.hidden_dim
        super().__init__(
            fl.Residual(PerceiverAttention(shape, device=device, dtype=dtype)),
            fl.Residual(
                fl.LayerNorm(dim, device=device, dtype=dtype),
                fl.Linear(dim, shape.feedforward_dim, bias=False, device=device, dtype=dtype),
                fl.GeLU(),
                fl.Linear(shape.feedforward_dim, dim, bias=False, device=device, dtype=dtype),
            ),
        )


class PerceiverResampler(fl.Chain):
    """IP-Adapter Plus's resampler: image features `(N, L, D)` to `(N, num_queries, cross_attention_dim)` tokens."""

    def __init__(
        self,
        image_embedding_dim: int,
        cross_attention_dim: int,
        shape: PerceiverShape,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Linear(image_embedding_dim, shape.hidden_dim, device=device, dtype=dtype),
            fl.SetContext(FEATURES_CONTEXT, "features"),
            fl.Parameter(shape.num_queries, shape.hidden_dim, device=device, dtype=dtype),
            (PerceiverBlock(shape, device=device, dtype=dtype) for _ in range(shape.depth)),
            fl.Linear(shape.hidden_dim, cross_attention_dim, device=device, dtype=dtype),
            fl.LayerNorm(cross_attention_dim, device=device, dtype=dtype),
        )

    def init_context(self) -> fl.Contexts:
        return {FEATURES_CONTEXT: {}}
