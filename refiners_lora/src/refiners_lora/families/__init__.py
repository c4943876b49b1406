"""The weight families a LoRA file holds per module, told apart by the roles of its keys, in one table.

`recognize(module)` says which family a module's keys are, their rank and alpha, and the factor the update takes,
or raises `UnsupportedLora` saying why they cannot be applied; `delta_shape` gives the weight shape they compose to.
`LoraManager` loads through them, so anything that inspects a file (`refiners lora inspect`) answers as it would.

| family    | keys (per module)                                            | update                           |
|-----------|--------------------------------------------------------------|----------------------------------|
| LoRA      | down, up (`lora_down` / `lora_A`...), optional Tucker `mid`  | `alpha / r * up @ down`          |
| LoHa      | `hada_w1_a/b`, `hada_w2_a/b`, optional `hada_t1` / `hada_t2` | `alpha / r * (w1a w1b) * (w2a w2b)` |
| LoKr      | `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, optional `lokr_t2` | `alpha / r * kron(w1, w2)` |
| full diff | `diff`, optional `diff_b` (bias)                              | the difference itself            |

Any of them may carry a DoRA magnitude (`dora_scale`, `lora_magnitude_vector`: `refiners_lora.families.dora`).
Families refiners-lora does not apply (OFT, BOFT, GLoRA, (IA)^3, LyCORIS norms, VeRA) are named in
`UNSUPPORTED_SUFFIXES`: a file holding one is refused, never partly loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch

from refiners_lora.families import diff, loha, lokr, lora

SHARED_ROLES = frozenset({"alpha", "dora_scale", "magnitude"})
"""Roles any family may have: its alpha, its DoRA magnitude (LyCORIS `dora_scale`, PEFT `lora_magnitude_vector`)."""

UNSUPPORTED_SUFFIXES: dict[str, str] = {
    ".oft_blocks": "OFT / BOFT (LyCORIS)",
    ".oft_diag": "OFT (LyCORIS)",
    ".oft_r": "OFT (PEFT)",
    ".oft_R.weight": "OFT (PEFT)",
    ".boft_R": "BOFT (PEFT)",
    ".boft_s": "BOFT (PEFT)",
    ".a1.weight": "GLoRA",
    ".a2.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".b2.weight": "GLoRA",
    ".on_input": "(IA)^3 (LyCORIS)",
    ".ia3_l": "(IA)^3 (PEFT)",
    ".w_norm": "norm (LyCORIS)",
    ".b_norm": "norm (LyCORIS)",
    ".vera_lambda_b": "VeRA (PEFT)",
    ".vera_lambda_d": "VeRA (PEFT)",
}
"""Key endings of the families refiners-lora does not apply -> the family's name."""


class UnsupportedLora(ValueError):
    """The keys of one module cannot be applied; the message says why (without the file's name)."""


@dataclass(frozen=True)
class Family:
    """One row of the table: a family's name, its roles, and how its tensors make a weight update."""

    name: str
    roles: frozenset[str]
    missing: Callable[[frozenset[str]], str | None]
    rank: Callable[[Mapping[str, torch.Tensor]], int | None]
    weight: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _family(name: str, module: ModuleType) -> Family:
    return Family(name, module.ROLES, module.missing, module.rank, module.weight)


FAMILIES = (_family("LoRA", lora), _family("LoHa", loha), _family("LoKr", lokr), _family("full diff", diff))


@dataclass(frozen=True)
class Recognized:
    """What one module's keys are: family, rank (None for a full diff or a whole LoKr), alpha (None if the file gives
    none), whether it has a DoRA magnitude, `factor` (alpha / rank, the number the family's weight is multiplied by)
    and the roles present."""

    family: Family
    rank: int | None
    alpha: float | None
    dora: bool
    factor: float
    roles: frozenset[str]

    @property
    def description(self) -> str:
        """E.g. "LoHa (Tucker) + DoRA", "LoRA"."""
        tucker = " (Tucker)" if {"mid", "hada_t1", "lokr_t2"} & self.roles else ""
        return f"{self.family.name}{tucker}{' + DoRA' if self.dora else ''}"

    @property
    def is_plain_lora(self) -> bool:
        """A LoRA / LoCon without Tucker middle kernel nor DoRA: the one `LoraAdapter` runs."""
        return self.family.name == "LoRA" and "mid" not in self.roles and not self.dora

    @property
    def outer_factor(self) -> float:
        """The factor the user's scale is multiplied by: `factor`, or 1 with DoRA (whose alpha / rank acts inside
        the norm, see `refiners_lora.families.dora`)."""
        return 1.0 if self.dora else self.factor


def recognize(tensors: Mapping[str, torch.Tensor], keys: Mapping[str, str]) -> Recognized:
    """The family of one module's tensors (role -> tensor; `keys`: role -> the file's key, for messages).

    Raises UnsupportedLora naming a key when the roles belong to several families or to none whole, a tensor is not
    floating point, or the alpha is not one finite number. Reads tensors' shapes, and the alpha's value only.
    """
    roles = frozenset(tensors)
    own = roles - SHARED_ROLES
    first = keys[next(iter(sorted(own or roles)))]
    families = [family for family in FAMILIES if family.roles & own]
    if not families:
        raise UnsupportedLora(f"'{first}' has no weights beside it to apply")
    if len(families) > 1:
        shown = " and ".join(f"{family.name} ('{keys[min(family.roles & own)]}')" for family in families)
        raise UnsupportedLora(f"keys of two families for one module: {shown}")
    (family,) = families
    problem = family.missing(own)
    if problem is not None:
        raise UnsupportedLora(f"'{first}' is a {family.name} weight with {problem}")
    for role, tensor in tensors.items():
        if role != "alpha" and not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise UnsupportedLora(f"'{keys[role]}' holds {dtype} values, not floating point weights")
    rank = family.rank(tensors)
    if rank == 0:
        raise UnsupportedLora(f"'{first}' has shape {tuple(tensors[sorted(own)[0]].shape)}: a rank-0 {family.name}")
    alpha = _alpha(tensors.get("alpha"), keys.get("alpha"))
    factor = 1.0 if alpha is None or rank is None else alpha / rank
    if {"dora_scale", "magnitude"} <= roles:
        raise UnsupportedLora(f"two DoRA magnitudes: '{keys['dora_scale']}' and '{keys['magnitude']}'")
    return Recognized(family, rank, alpha, bool({"dora_scale", "magnitude"} & roles), factor, roles)


def delta_shape(recognized: Recognized, tensors: Mapping[str, torch.Tensor], keys: Mapping[str, str]) -> torch.Size:
    """The shape of the weight update the tensors compose to, computed on the meta device (no arithmetic).

    Raises UnsupportedLora naming the keys when their shapes do not compose.
    """
    meta = {role: torch.empty(tensor.shape, device="meta") for role, tensor in tensors.items() if role != "alpha"}
    try:
        return recognized.family.weight(meta).shape
    except RuntimeError as error:
        shown = ", ".join(f"'{keys[role]}' {tuple(tensor.shape)}" for role, tensor in meta.items())
        raise UnsupportedLora(f"the {recognized.family.name} weights {shown} do not compose: {error}") from None


def _alpha(alpha: torch.Tensor | None, key: str | None) -> float | None:
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise UnsupportedLora(f"'{key}' has shape {tuple(alpha.shape)}, expected a single number")
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise UnsupportedLora(f"'{key}' holds a {str(alpha.dtype).removeprefix('torch.')}, not a number")
    value = float(alpha.item())
    if not math.isfinite(value):
        raise UnsupportedLora(f"'{key}' is {alpha.item()}, not a finite alpha")
    return value
