"""FreeU for refiners' Stable Diffusion 1.5 and SDXL UNets: rescale backbone and skip features in the decoder, no
weights.

from refiners_freeu import FreeU

freeu = FreeU(sd.unet, s1=0.9, s2=0.2, b1=1.2, b2=1.4).inject()
"""

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
