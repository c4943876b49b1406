"""Which layers of Stable Diffusion 1.5 get a LoRA, chosen by their diffusers / transformers module names.

- `"attention"`: the query, key, value and output projections of every UNet attention (`attn1` self-attention and
  `attn2` cross-attention: `to_q`, `to_k`, `to_v`, `to_out.0`), as diffusers' and PEFT's LoRA training does.
- `"attention+conv"`: the above and, LoCon-style, every convolution of the UNet's residual blocks (`conv1`, `conv2`,
  `conv_shortcut`) and of its down- and upsamplers.
- with the text encoder: the `q_proj`, `k_proj`, `v_proj` and `out_proj` of every CLIP self-attention.

Every chosen layer has a kohya and a diffusers name, so the trained LoRA exports to both.
"""

from __future__ import annotations

import re

from refiners_core.module_names import DIFFUSERS
from refiners_sd15 import StableDiffusion_1
from refiners_training.config import LayerSelection

UNET_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_CONV = re.compile(r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut)|\.(downsamplers|upsamplers)\.\d+\.conv)$")
TEXT_ATTENTION = re.compile(r"^text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def lora_layer_paths(sd: StableDiffusion_1, layers: LayerSelection, train_text_encoder: bool) -> list[str]:
    """The paths (relative to `sd`, e.g. `unet.DownBlocks...Linear_1`) of the layers to train, in model order.

    Raises ValueError if the selection finds no layer (a model whose layers have no diffusers names).
    """
    patterns = [UNET_ATTENTION] + ([UNET_CONV] if layers == "attention+conv" else [])
    chosen = {
        f"unet.{path}"
        for name, path in sd.unet.foreign_module_names(DIFFUSERS).items()
        if any(pattern.search(name) for pattern in patterns)
    }
    if train_text_encoder:
        chosen |= {
            f"clip_text_encoder.{path}"
            for name, path in sd.clip_text_encoder.foreign_module_names(DIFFUSERS).items()
            if TEXT_ATTENTION.search(name)
        }
    paths = [name for name, _ in sd.named_modules() if name in chosen]
    if not paths:
        raise ValueError(f"lora.layers = {layers!r} selects no layer of {type(sd).__name__}")
    return paths
