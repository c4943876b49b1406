"""Multi-head attention built from Linear layers and `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from refiners_core.fluxion.chain import Chain, Distribute, Parallel
from refiners_core.fluxion.layers.basics import Identity
from refiners_core.fluxion.layers.linear import Linear
from refiners_core.fluxion.module import Device, Module


class ScaledDotProductAttention(Module):
    """`softmax(q kᵀ / √d) v` over `num_heads` heads, for `(B, L, heads * d)` queries, keys and values."""

    def __init__(self, num_heads: int = 1, is_causal: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        attended = F.scaled_dot_product_attention(
            self._split_heads(query), self._split_heads(key), self._split_heads(value), is_causal=self.is_causal
        )
        batch, heads, length, head_dim = attended.shape
        return attended.transpose(1, 2).reshape(batch, length, heads * head_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}" + (", is_causal=True" if self.is_causal else "")


class Attention(Chain):
    """Multi-head attention taking `(query, key, value)`: projections, attention, output projection."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int = 1,
        key_embedding_dim: int | None = None,
        value_embedding_dim: int | None = None,
        inner_dim: int | None = None,
        use_bias: bool = True,
        is_causal: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        inner_dim = inner_dim or embedding_dim
        if inner_dim % num_heads:
            raise ValueError(f"Attention: inner_dim={inner_dim} is not divisible by num_heads={num_heads}")
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.key_embedding_dim = key_embedding_dim or embedding_dim
        self.value_embedding_dim = value_embedding_dim or embedding_dim
        self.inner_dim = inner_dim
        super().__init__(
            Distribute(
                Linear(embedding_dim, inner_dim, bias=use_bias, device=device, dtype=dtype),
                Linear(self.key_embedding_dim, inner_dim, bias=use_bias, device=device, dtype=dtype),
                Linear(self.value_embedding_dim, inner_dim, bias=use_bias, device=device, dtype=dtype),
            ),
            ScaledDotProductAttention(num_heads=num_heads, is_causal=is_causal),
            Linear(inner_dim, embedding_dim, bias=True, device=device, dtype=dtype),
        )

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_heads={self.num_heads}"


class SelfAttention(Attention):
    """Attention of a sequence to itself: the input is used as query, key and value."""

    def __init__(
        self,
        embedding_dim: int,
        inner_dim: int | None = None,
        num_heads: int = 1,
        use_bias: bool = True,
        is_causal: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            embedding_dim,
            num_heads=num_heads,
            inner_dim=inner_dim,
            use_bias=use_bias,
            is_causal=is_causal,
            device=device,
            dtype=dtype,
        )
        self.insert(0, Parallel(Identity(), Identity(), Identity()))
