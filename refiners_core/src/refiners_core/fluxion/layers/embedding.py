"""Lookup tables."""

from __future__ import annotations

import torch
from torch import nn

from refiners_core.fluxion.module import Device, Module


class Embedding(Module, nn.Embedding):
    """`torch.nn.Embedding`: one learned vector per index."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
