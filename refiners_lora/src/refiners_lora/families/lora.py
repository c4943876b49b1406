"""LoRA and LoCon, with or without a Tucker middle kernel (LyCORIS `lora_mid.weight`).

`down` `(r, in, *k)` and `up` `(out, r, 1, 1)` compose to `up @ down`; with a Tucker `mid` `(r, r, *k)`, `down` is a
1x1 projection `(r, in, 1, 1)` and the kernel is in `mid`. The update is `alpha / r` times that weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refiners_lora.families.tucker import rebuild_tucker

ROLES = frozenset({"down", "up", "mid"})


def missing(roles: frozenset[str]) -> str | None:
    """What the roles lack to make a LoRA, or None."""
    absent = [role for role in ("down", "up") if role not in roles]
    return f"no {' and no '.join(absent)} weights beside it" if absent else None


def rank(tensors: Mapping[str, torch.Tensor]) -> int:
    return tensors["down"].shape[0]


def weight(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`up @ down` (`(out, in, *k)` for a convolution's down kernel), through `mid` if there is one."""
    down, up = tensors["down"], tensors["up"]
    if "mid" in tensors:
        return rebuild_tucker(tensors["mid"], up.flatten(1).t(), down)
    return torch.einsum("or,r...->o...", up.flatten(1), down)
