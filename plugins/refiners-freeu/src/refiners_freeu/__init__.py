"""FreeU for refiners' Stable Diffusion 1.5 and SDXL UNets: rescale backbone and skip features in the decoder, no
weights.

from refiners_freeu import FreeU

freeu = FreeU(sd.unet, s1=0.9, s2=0.2, b1=1.2, b2=1.4).inject()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_freeu.freeu import (
        SD15_SCALES,
        SDXL_SCALES,
        BackboneScale,
        FourierFilter,
        FreeU,
        FreeUAdapter,
        SkipFilter,
        default_scales,
    )


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SD15_SCALES": "refiners_freeu.freeu",
        "SDXL_SCALES": "refiners_freeu.freeu",
        "BackboneScale": "refiners_freeu.freeu",
        "FourierFilter": "refiners_freeu.freeu",
        "FreeU": "refiners_freeu.freeu",
        "FreeUAdapter": "refiners_freeu.freeu",
        "SkipFilter": "refiners_freeu.freeu",
        "default_scales": "refiners_freeu.freeu",
    },
)

__all__ = [
    "SD15_SCALES",
    "SDXL_SCALES",
    "BackboneScale",
    "FourierFilter",
    "FreeU",
    "FreeUAdapter",
    "SkipFilter",
    "default_scales",
]
