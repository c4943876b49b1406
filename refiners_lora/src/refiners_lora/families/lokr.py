"""LoKr (LyCORIS `lokr_*`, PEFT `LoKrConfig`): the Kronecker product of two factors, each whole or low-rank.

`kron(w1, w2)` with `w1 = lokr_w1` `(a, c)` or `lokr_w1_a @ lokr_w1_b`, and `w2 = lokr_w2` `(b, d, *k)` or
`lokr_w2_a @ lokr_w2_b` (`(b, r) @ (r, d * kh * kw)`), or with a Tucker core `lokr_t2` `(r, r, *k)` between
`lokr_w2_a` `(r, b)` and `lokr_w2_b` `(r, d)`. The update is `alpha / r` times that weight, `r` the rank of the
low-rank factor (`lokr_w1_b`, else `lokr_w2_b`); with both factors whole, as in LyCORIS, it is the weight itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refiners_lora.families.tucker import rebuild_tucker

ROLES = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})


def missing(roles: frozenset[str]) -> str | None:
    problems: list[str] = []
    for factor in ("lokr_w1", "lokr_w2"):
        whole, low_rank = factor in roles, {f"{factor}_a", f"{factor}_b"} & roles
        if whole and low_rank:
            problems.append(f"both {factor} and {', '.join(sorted(low_rank))}")
        elif not whole and len(low_rank) < 2:
            problems.append(f"no {factor} nor both {factor}_a and {factor}_b")
    if "lokr_t2" in roles and "lokr_w2" in roles:
        problems.append("lokr_t2 beside a whole lokr_w2")
    return "; ".join(problems) or None


def rank(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank of the low-rank factor, None when both factors are whole."""
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in tensors:
            return tensors[key].shape[0]
    return None


def weight(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`kron(w1, w2)`: `(a * b, c * d, *k)`, or `(a * b, c * d * kh * kw)` for a flat `lokr_w2_b`."""
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
    elif "lokr_t2" in tensors:
        w2 = rebuild_tucker(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    else:
        w2_b = tensors["lokr_w2_b"]
        w2 = (tensors["lokr_w2_a"] @ w2_b.flatten(1)).reshape(-1, *w2_b.shape[1:])
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim)), w2.contiguous())  # kron views its input
