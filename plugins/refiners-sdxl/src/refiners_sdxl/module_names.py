"""How SDXL models name their layers in diffusers' and kohya's conventions (the `ForeignModuleNames` protocol of
`refiners_core.module_names`), so that LoRA files written for SDXL load onto them and LoRAs made here are written
in those layouts.

- diffusers / PEFT: `unet.` + `UNet2DConditionModel` module paths (also without `unet.`, as older files write them),
  `text_encoder.` + CLIP-L's and `text_encoder_2.` + CLIP-G's transformers module paths.
- kohya: `lora_unet_` + the diffusers or the original checkpoint's UNet paths (`input_blocks_4_1_proj_in`), with `_`
  for `.`; `lora_te1_` + CLIP-L's and `lora_te2_` + CLIP-G's transformers paths.
"""

from __future__ import annotations

from collections.abc import Mapping

from refiners_core.module_names import DIFFUSERS, KOHYA, prefixed
from refiners_sd15.clip import CLIPTextEncoderL
from refiners_sdxl.unet import SDXLUNet

KOHYA_TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
"""diffusers component -> the prefix of its modules in kohya's SDXL LoRA files."""


def sdxl_foreign_module_names(
    unet: SDXLUNet, text_encoders: Mapping[str, tuple[str, CLIPTextEncoderL]], convention: str
) -> dict[str, str]:
    """Foreign module name -> layer path (relative to the model holding `unet` as `unet`), for `convention`.

    `text_encoders` gives, per diffusers component (`text_encoder`, `text_encoder_2`), the path of the encoder in
    the model and the encoder. A convention other than `DIFFUSERS` and `KOHYA` gives an empty mapping.
    """
    if convention not in (DIFFUSERS, KOHYA):
        return {}
    unet_names = unet.foreign_module_names(convention)
    names = prefixed(unet_names, "unet.", "unet.") if convention == DIFFUSERS else {}
    names |= prefixed(unet_names, "", "unet.")
    for component, (path, encoder) in text_encoders.items():
        encoder_names = encoder.foreign_module_names(convention)
        if convention == DIFFUSERS:
            names |= prefixed(encoder_names, f"{component}.", f"{path}.")
        else:
            kohya = KOHYA_TEXT_ENCODER_PREFIXES[component]
            names |= {kohya + name.removeprefix("lora_te_"): f"{path}.{ours}" for name, ours in encoder_names.items()}
    return names
