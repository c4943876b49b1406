"""DoRA (weight-decomposed LoRA): a magnitude per output channel (or per input channel) on top of any family.

The updated weight is `m * (W + dW) / ||W + dW||`, the norm taken per output row (PEFT's `lora_magnitude_vector`,
role "magnitude", `(out,)` or `(1, out, 1, 1)`; LyCORIS's `dora_scale` `(out, 1, ...)`) or per input column
(`dora_scale` `(1, in, ...)`, sd-scripts and older LyCORIS files), with `dW` the family's update (its alpha / rank
included). At scale `s` the layer moves by `s` times the change, `W + s * (m * (W + dW) / ||W + dW|| - W)`, as
ComfyUI and A1111 apply it; scale 1 is what PEFT and LyCORIS compute.
"""

from __future__ import annotations

import torch


def per_output(role: str, magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> bool | None:
    """True for a norm per output row, False per input column, None if `magnitude` (of `role`, "dora_scale" or
    "magnitude") fits neither."""
    out, inputs = weight_shape[0], weight_shape[1]
    if role == "magnitude":
        return True if magnitude.numel() == out else None
    if magnitude.numel() == out and (magnitude.ndim == 1 or magnitude.shape[0] == out):
        return True
    if magnitude.numel() == inputs and magnitude.ndim >= 2 and magnitude.shape[1] == inputs:
        return False
    return None


def change(weight: torch.Tensor, delta: torch.Tensor, role: str, magnitude: torch.Tensor) -> torch.Tensor:
    """`m * (W + dW) / ||W + dW|| - W` in `weight`'s shape (computed in float32 at least)."""
    updated = _updated(weight, delta)
    return updated * _norm_scale(updated, role, magnitude) - weight.to(updated.dtype)


def output_scale(weight: torch.Tensor, delta: torch.Tensor, role: str, magnitude: torch.Tensor) -> torch.Tensor:
    """`m / ||W + dW||`, one number per output channel (shape `(out,)`, float32 at least), for a magnitude whose norm
    is per output row (`per_output` is True): the layer's new output is then `c * (W x + dW x)`, `c` this vector."""
    updated = _updated(weight, delta)
    return _norm_scale(updated, role, magnitude).reshape(-1)


def _updated(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype) + delta.to(dtype)


def _norm_scale(updated: torch.Tensor, role: str, magnitude: torch.Tensor) -> torch.Tensor:
    """`m / ||updated||` in the shape that broadcasts over `updated` (per output row, or per input column)."""
    if per_output(role, magnitude, tuple(updated.shape)):
        norm = updated.flatten(1).square().sum(dim=1).sqrt().reshape(-1, *[1] * (updated.ndim - 1))
    else:
        rows = updated.transpose(0, 1).flatten(1)
        norm = rows.square().sum(dim=1).sqrt().reshape(1, -1, *[1] * (updated.ndim - 2))
    return magnitude.to(updated.dtype).reshape(norm.shape) / norm
