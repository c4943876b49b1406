"""Write a LoRA's weights in the refiners, kohya or diffusers / PEFT layout, the way `formats` reads them back.

- refiners: `<layer path>.down.weight`, `.up.weight`, `.alpha`, our own layer paths.
- kohya: `<kohya name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (a LoCon convolution keeps its kernel in the
  down weight, and a 1x1 up).
- diffusers / PEFT: `<diffusers name>.lora_A.weight`, `.lora_B.weight`, with alpha / rank baked into `lora_B` (PEFT
  files carry no alpha key; baking keeps `load_lora_weights` exact without relying on metadata).

The foreign names come from the model (`refiners_core.module_names.ForeignModuleNames`): where several foreign
names lead to one layer, the first one the model lists is written (the published layout, e.g. `unet.` + the UNet's
path). Layers that the other library runs as 1x1 convolutions (`ForeignPointwiseConvolutions`) get 4-D weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.module_names import ForeignModuleNames, ForeignPointwiseConvolutions
from refiners_lora.adapter import LoraAdapter
from refiners_lora.formats import CONVENTIONS, Format


def lora_state_dict(
    model: nn.Module, adapters: Sequence[tuple[str, LoraAdapter, float]], lora_format: Format, lora: str
) -> dict[str, torch.Tensor]:
    """The tensors of one LoRA, given as (layer path, adapter, alpha / rank) triples, in `lora_format`.

    The tensors are copies in the LoRA's dtype; the user's scale is not part of them. Raises ValueError for an
    unknown format, a model that does not name its layers in the format's convention, or a layer path with no
    foreign name (naming `lora` and the path).
    """
    if lora_format not in CONVENTIONS:
        known = ", ".join(repr(name) for name in CONVENTIONS)
        raise ValueError(f"unknown LoRA format {lora_format!r} for LoRA {lora!r} (expected one of {known})")
    convention = CONVENTIONS[lora_format]
    names: dict[str, str] = {}
    pointwise: set[str] = set()
    if convention is not None:
        model_name = type(model).__name__
        if not isinstance(model, ForeignModuleNames):
            raise ValueError(
                f"cannot write LoRA {lora!r} in the {lora_format} format: {model_name} does not name its layers the "
                f"{convention} way (it does not implement refiners_core.module_names.ForeignModuleNames)"
            )
        for foreign, path in model.foreign_module_names(convention).items():
            names.setdefault(path, foreign)
        if isinstance(model, ForeignPointwiseConvolutions):
            pointwise = set(model.foreign_pointwise_convolutions(convention))
        missing = [path for path, _, _ in adapters if path not in names]
        if missing:
            shown = ", ".join(f"`{model_name}.{path}`" for path in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"cannot write LoRA {lora!r} in the {lora_format} format: {len(missing)} layer(s) have no {convention} "
                f"name: {shown}"
            )
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter, factor in adapters:
        down, up = _weights(adapter)
        if convention is None:
            tensors |= {f"{path}.down.weight": down, f"{path}.up.weight": up, f"{path}.alpha": _alpha(adapter, factor)}
            continue
        name = names[path]
        if name in pointwise and down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if lora_format == "kohya":
            tensors |= {
                f"{name}.lora_down.weight": down,
                f"{name}.lora_up.weight": up,
                f"{name}.alpha": _alpha(adapter, factor),
            }
        else:
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * factor}
    return tensors


def _weights(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) copies: `(rank, in)` / `(out, rank)` for a Linear, `(rank, in, kh, kw)` / `(out, rank, 1, 1)` for a
    Conv2d."""
    down, up = adapter.lora.down, adapter.lora.up
    assert isinstance(down, (fl.Linear, fl.Conv2d)) and isinstance(up, (fl.Linear, fl.Conv2d))
    return down.weight.detach().clone(), up.weight.detach().clone()


def _alpha(adapter: LoraAdapter, factor: float) -> torch.Tensor:
    return torch.tensor(factor * adapter.rank, dtype=torch.float32)
