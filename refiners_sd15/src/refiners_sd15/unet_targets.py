"""The UNets an adapter plugin for SD1.5 and SDXL registers as its targets, named without importing them."""

from __future__ import annotations

import importlib.util

from refiners_core.plugins import Reference


def sd_unet_targets() -> tuple[Reference, ...]:
    """`SD1UNet`, and `SDXLUNet` when refiners-sdxl is installed: the `AdapterSpec.targets` of an adapter that fits
    both. Imports neither (a plugin module registers without torch)."""
    targets = (Reference("refiners_sd15.unet:SD1UNet"),)
    if importlib.util.find_spec("refiners_sdxl") is not None:
        targets += (Reference("refiners_sdxl.unet:SDXLUNet"),)
    return targets
