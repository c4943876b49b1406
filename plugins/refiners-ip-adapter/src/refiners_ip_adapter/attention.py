"""`ImageCrossAttention`: the second, image-fed attention IP-Adapter adds to a cross-attention of the UNet.

It takes the place of the `ScaledDotProductAttention` of the UNet's text cross-attention, so the query is shared and
the output projection applies to the sum, as in IP-Adapter's decoupled cross-attention:

    Attention (to the text)                 Attention
      Distribute (to_q, to_k, to_v)           Distribute (to_q, to_k, to_v)
      ScaledDotProductAttention     ->        ImageCrossAttention
      Linear (to_out)                           Sum
                                                  ScaledDotProductAttention       (the text)
                                                  ImageAttention                  (scale * attention to the image)
                                              Linear (to_out)
"""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device


class ImageTokens(fl.Module):
    """The image tokens `(B, T, C)` of the `<context>.image_embedding` context, repeated to the batch of the query
    (the first input), on its device and with its dtype: a batch of 2 (unconditional, conditional) serves a batch of
    2k queries as k unconditional then k conditional ones, as diffusers' pipelines repeat it."""

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def forward(self, query: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor | None = self.use_context(self.context, key="image_embedding").get("image_embedding")
        if tokens is None:
            raise fl.ContextError(
                f"the IP-Adapter at `{self.get_path()}` has no image embedding: call "
                "ip_adapter.set_image_embedding(ip_adapter.compute_image_embedding(images)) first"
            )
        batch = query.shape[0]
        if tokens.shape[0] != batch:
            if batch % tokens.shape[0]:
                raise ValueError(
                    f"IP-Adapter: an image embedding of batch {tokens.shape[0]} cannot serve a batch of {batch}"
                )
            tokens = tokens.repeat_interleave(batch // tokens.shape[0], dim=0)
        return tokens.to(device=query.device, dtype=query.dtype)

    def extra_repr(self) -> str:
        return f"context={self.context!r}"


class ImageKeys(fl.Chain):
    """The image tokens through `to_k_ip` (a linear map without bias)."""

    def __init__(
        self, context: str, image_dim: int, inner_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(ImageTokens(context), fl.Linear(image_dim, inner_dim, bias=False, device=device, dtype=dtype))


class ImageValues(fl.Chain):
    """The image tokens through `to_v_ip` (a linear map without bias)."""

    def __init__(
        self, context: str, image_dim: int, inner_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(ImageTokens(context), fl.Linear(image_dim, inner_dim, bias=False, device=device, dtype=dtype))


class ImageAttention(fl.Chain):
    """`scale * attention(query, to_k_ip(image), to_v_ip(image))`, for the `(query, key, value)` of the text
    attention (whose key and value it ignores)."""

    def __init__(
        self,
        context: str,
        image_dim: int,
        inner_dim: int,
        num_heads: int,
        scale: float,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.GetArg(0),
                ImageKeys(context, image_dim, inner_dim, device=device, dtype=dtype),
                ImageValues(context, image_dim, inner_dim, device=device, dtype=dtype),
            ),
            fl.ScaledDotProductAttention(num_heads=num_heads),
            fl.Multiply(scale),
        )


class ImageCrossAttention(fl.Chain, fl.Adapter[fl.ScaledDotProductAttention]):
    """Add the attention to the image to a text cross-attention's (see the module docstring)."""

    def __init__(
        self,
        target: fl.ScaledDotProductAttention,
        context: str,
        image_dim: int,
        inner_dim: int,
        scale: float,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(
                fl.Sum(
                    target,
                    ImageAttention(context, image_dim, inner_dim, target.num_heads, scale, device=device, dtype=dtype),
                )
            )

    @property
    def scale(self) -> float:
        """The weight of the attention to the image."""
        return self.ensure_find(fl.Multiply).scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.ensure_find(fl.Multiply).scale = value


KEY_WEIGHT = "Sum.ImageAttention.Parallel.ImageKeys.Linear.weight"
"""The `to_k_ip` weight in an `ImageCrossAttention`'s state dict."""
VALUE_WEIGHT = "Sum.ImageAttention.Parallel.ImageValues.Linear.weight"
"""The `to_v_ip` weight in an `ImageCrossAttention`'s state dict."""
