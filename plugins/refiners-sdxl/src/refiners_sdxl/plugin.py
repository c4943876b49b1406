"""The refiners plugin of refiners-sdxl (entry point `sdxl = refiners_sdxl.plugin`).

It registers the `sdxl` model (`StableDiffusion_XL.from_pretrained`); nothing is built or read here. Solvers are
refiners-sd15's, registered by its plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    from refiners_sdxl.model import StableDiffusion_XL

    register(
        ModelSpec(
            name="sdxl",
            loader=StableDiffusion_XL.from_pretrained,
            summary="Stable Diffusion XL (base): StableDiffusion_XL.from_pretrained(diffusers folder or hub id)",
        )
    )
