"""Full-weight differences (LyCORIS `full`): `diff` has the target's weight shape, `diff_b` its bias shape.

No rank and no alpha: the update is the difference itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ROLES = frozenset({"diff", "diff_b"})


def missing(roles: frozenset[str]) -> str | None:
    return None if "diff" in roles else "no diff weight beside it"


def rank(tensors: Mapping[str, torch.Tensor]) -> None:
    return None


def weight(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return tensors["diff"]
