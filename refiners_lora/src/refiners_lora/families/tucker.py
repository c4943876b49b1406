"""The Tucker rebuild that LoCon's `lora_mid`, LoHa's `hada_t1` / `hada_t2` and LoKr's `lokr_t2` share."""

from __future__ import annotations

import torch


def rebuild_tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """The kernel `(out, in, *k)` of a Tucker core `(r, r', *k)` between `out_factor` `(r, out)` and `in_factor`
    `(r', in)`: the convolution by the core, preceded and followed by 1x1 projections, as one kernel."""
    return torch.einsum("ij...,ip,jq->pq...", core, out_factor, in_factor.flatten(1))
