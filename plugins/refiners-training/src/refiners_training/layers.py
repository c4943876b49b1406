"""Which layers get a LoRA, chosen by their diffusers / transformers module names (the same for SD1.5 and SDXL).

- `"attention"`: the query, key, value and output projections of every UNet attention (`attn1` self-attention and
  `attn2` cross-attention: `to_q`, `to_k`, `to_v`, `to_out.0`), as diffusers' and PEFT's LoRA training does.
- `"attention+conv"`: the above and, LoCon-style, every convolution of the UNet's residual blocks (`conv1`, `conv2`,
  `conv_shortcut`) and of its down- and upsamplers.
- with the text encoders: the `q_proj`, `k_proj`, `v_proj` and `out_proj` of every CLIP self-attention (of SDXL's
  CLIP-L, all but the last layer's: SDXL reads its penultimate hidden states).

Every chosen layer has a kohya and a diffusers name, so the trained LoRA exports to both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from refiners_core.module_names import DIFFUSERS, ForeignModuleNames
from refiners_training.config import LayerSelection

UNET_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_CONV = re.compile(r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut)|\.(downsamplers|upsamplers)\.\d+\.conv)$")


def text_attention(but_layer: int | None = None) -> re.Pattern[str]:
    """The transformers module names of the CLIP self-attention projections, of every layer but `but_layer`."""
    layer = r"\d+" if but_layer is None else rf"(?!{but_layer}\.)\d+"
    return re.compile(rf"^text_model\.encoder\.layers\.{layer}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


TEXT_ATTENTION = text_attention()


def unet_patterns(layers: LayerSelection) -> list[re.Pattern[str]]:
    """The diffusers module names of the UNet layers `lora.layers` selects."""
    return [UNET_ATTENTION] + ([UNET_CONV] if layers == "attention+conv" else [])


def select_layers(
    model: nn.Module, components: Sequence[tuple[ForeignModuleNames, Sequence[re.Pattern[str]]]]
) -> list[str]:
    """The paths (relative to `model`, e.g. `unet.DownBlocks...Linear_1`) of the layers of each component (a
    submodule of `model`) whose diffusers / transformers name matches one of its patterns, in model order.

    Raises ValueError if no layer is chosen (a model whose layers have no diffusers names).
    """
    # torch leaves the return type of named_modules unannotated
    modules: list[tuple[str, nn.Module]] = list(model.named_modules())  # pyright: ignore[reportUnknownArgumentType]
    prefixes = {id(module): name for name, module in modules}
    chosen: set[str] = set()
    for component, patterns in components:
        prefix = prefixes[id(component)]
        chosen |= {
            f"{prefix}.{path}"
            for name, path in component.foreign_module_names(DIFFUSERS).items()
            if any(pattern.search(name) for pattern in patterns)
        }
    paths = [name for name, _ in modules if name in chosen]
    if not paths:
        raise ValueError(f"the configured `lora.layers` select no layer of {type(model).__name__}")
    return paths
