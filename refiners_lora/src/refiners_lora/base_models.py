"""Tell which base model a LoRA file was made for, so that a LoRA of one model given to another (an SD1.5 LoRA to
SDXL, or the reverse) is refused in one line naming both, before anything is applied.

Two clues, read from the file's module names (`ForeignModuleNames` conventions) and compared with the model's own:
- the text-encoder prefixes: `lora_te_` (SD1.5), `lora_te1_` / `lora_te2_` and `text_encoder_2.` (SDXL's two
  encoders);
- the width of the text embedding the UNet's cross-attention keys and values take (`attn2.to_k`, `attn2.to_v`):
  768 for SD1.5, 1024 for SD2.x, 2048 for SDXL, 1280 for SDXL's refiner.
A clue that the file does not give (no text-encoder keys, no cross-attention LoRA, a width of no model listed here)
proves nothing: such files meet the usual checks (keys that match no layer, shapes that do not fit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.weights import WeightsError

TEXT_ENCODER_PREFIXES: dict[str, str | None] = {
    "text_encoder.": None,  # CLIP-L, in SD1.5 and SDXL alike
    "lora_te_": "SD1.5",
    "lora_te1_": "SDXL",
    "lora_te2_": "SDXL",
    "text_encoder_2.": "SDXL",
}
"""The prefix of a text encoder's modules -> the model whose LoRA files use it (None: several do)."""
CROSS_ATTENTION_WIDTHS: dict[int, str] = {768: "SD1.5", 1024: "SD2.x", 1280: "the SDXL refiner", 2048: "SDXL"}
"""The width of the text embedding of the UNet's cross-attention -> the model."""
CROSS_ATTENTION_MODULES = ("attn2.to_k", "attn2.to_v", "attn2_to_k", "attn2_to_v")
"""How the modules whose input is the text embedding end, in every convention."""


def check_base_model(
    source: str,
    file_modules: Mapping[str, torch.Tensor],
    model: nn.Module,
    model_names: Mapping[str, str],
    layer: Callable[[str], nn.Module | None],
) -> None:
    """Raise WeightsError naming `source`, the model the file was made for and `model` when their clues differ.

    `file_modules` gives the file's module names (in the convention of `model_names`, the model's foreign name ->
    layer path) and each one's down weight; `layer(path)` gives the model's layer at a path (or None).
    """
    model_prefixes = _prefixes(model_names)
    foreign_prefixes = sorted(_prefixes(file_modules) - model_prefixes) if model_prefixes else []
    foreign_prefixes = [prefix for prefix in foreign_prefixes if TEXT_ENCODER_PREFIXES[prefix] is not None]
    model_widths = {
        found.in_features
        for name, path in model_names.items()
        if name.endswith(CROSS_ATTENTION_MODULES) and isinstance(found := layer(path), fl.Linear)
    }
    file_widths = {
        name: down.shape[1]
        for name, down in file_modules.items()
        if name.endswith(CROSS_ATTENTION_MODULES) and down.ndim == 2
    }
    other_width = next(
        (
            (n, w)
            for n, w in file_widths.items()
            if w in CROSS_ATTENTION_WIDTHS and model_widths and w not in model_widths
        ),
        None,
    )
    if not foreign_prefixes and other_width is None:
        return
    if other_width is not None:
        module, width = other_width
        made_for, clue = CROSS_ATTENTION_WIDTHS[width], f"'{module}' takes {width}-wide text embeddings"
    else:
        made_for = _family(_prefixes(file_modules)) or str(TEXT_ENCODER_PREFIXES[foreign_prefixes[0]])
        clue = _text_encoder_clue(set(foreign_prefixes))
    model_width = max(model_widths, default=0)
    if model_width in CROSS_ATTENTION_WIDTHS:
        model_is, model_clue = CROSS_ATTENTION_WIDTHS[model_width], f"{model_width}-wide text embeddings"
    else:
        model_is, model_clue = _family(model_prefixes), _text_encoder_clue(model_prefixes)
    if model_is == made_for:  # e.g. a small test model: say what differs rather than the same name twice
        model_is = None
    name = type(model).__name__
    which = f"but {name} is {model_is} ({model_clue})" if model_is else f"not for {name}"
    raise WeightsError(f"{source} is a LoRA for {made_for} ({clue}), {which}: nothing was loaded")


def _prefixes(names: Iterable[str]) -> set[str]:
    return {prefix for name in names for prefix in TEXT_ENCODER_PREFIXES if name.startswith(prefix)}


def _family(prefixes: set[str]) -> str | None:
    families = {family for prefix in prefixes if (family := TEXT_ENCODER_PREFIXES[prefix]) is not None}
    return families.pop() if len(families) == 1 else None


def _text_encoder_clue(prefixes: set[str]) -> str:
    named = sorted(prefix for prefix in prefixes if TEXT_ENCODER_PREFIXES[prefix] is not None)
    return "text-encoder modules " + ", ".join(f"'{prefix}*'" for prefix in named)


def guess_base_model(file_modules: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """The model a LoRA file was made for, told by the clues above alone, as `(model, clue)`, e.g. `("SDXL",
    "'lora_unet_..._attn2_to_k' takes 2048-wide text embeddings")`; None when the file gives no clue or clues that
    disagree. `file_modules` gives the file's module names and each one's down weight (a meta tensor will do)."""
    widths = {
        down.shape[1]: name
        for name, down in file_modules.items()
        if name.endswith(CROSS_ATTENTION_MODULES) and down.ndim == 2 and down.shape[1] in CROSS_ATTENTION_WIDTHS
    }
    prefixes = _prefixes(file_modules)
    family = _family(prefixes)
    if len(widths) > 1:
        return None
    if widths:
        ((width, name),) = widths.items()
        made_for = CROSS_ATTENTION_WIDTHS[width]
        if family is not None and family != made_for:
            return None
        return made_for, f"'{name}' takes {width}-wide text embeddings"
    if family is None:
        return None
    return family, _text_encoder_clue(prefixes)
