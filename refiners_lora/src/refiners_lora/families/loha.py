"""LoHa (LyCORIS `hada_*`, PEFT `LoHaConfig`): the Hadamard product of two low-rank products.

`(hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)`, `w*_a` `(out, r)` and `w*_b` `(r, in * kh * kw)`; with Tucker cores
`hada_t1` / `hada_t2` `(r, r, *k)`, `w*_a` is `(r, out)`, `w*_b` `(r, in)` and each product is a Tucker rebuild. The
update is `alpha / r` times that weight, `r` the rank of `hada_w1_b`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refiners_lora.families.tucker import rebuild_tucker

ROLES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})


def missing(roles: frozenset[str]) -> str | None:
    absent = [role for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if role not in roles]
    if ("hada_t1" in roles) != ("hada_t2" in roles):
        absent.append("hada_t2" if "hada_t1" in roles else "hada_t1")
    return f"no {', '.join(absent)} beside it" if absent else None


def rank(tensors: Mapping[str, torch.Tensor]) -> int:
    return tensors["hada_w1_b"].shape[0]


def weight(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The Hadamard product, `(out, in * kh * kw)` without Tucker cores, `(out, in, kh, kw)` with them."""
    if "hada_t1" in tensors:
        first = rebuild_tucker(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
        second = rebuild_tucker(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"])
    else:
        first = tensors["hada_w1_a"].flatten(1) @ tensors["hada_w1_b"].flatten(1)
        second = tensors["hada_w2_a"].flatten(1) @ tensors["hada_w2_b"].flatten(1)
    return first * second
