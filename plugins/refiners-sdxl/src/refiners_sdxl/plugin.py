"""The refiners plugin of refiners-sdxl (entry point `sdxl = refiners_sdxl.plugin`).

It registers the `sdxl` model (`StableDiffusion_XL.from_pretrained`) with what `refiners generate` needs to run it
(`detect_sdxl`, 1024x1024 by default, `generate_sdxl`); nothing is built or read here. Solvers are refiners-sd15's,
registered by its plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    from refiners_sdxl.generation import SDXL_DEFAULT_SIZE, detect_sdxl, generate_sdxl
    from refiners_sdxl.model import StableDiffusion_XL

    register(
        ModelSpec(
            name="sdxl",
            loader=StableDiffusion_XL.from_pretrained,
            summary="Stable Diffusion XL (base): StableDiffusion_XL.from_pretrained(diffusers folder, hub id or "
            "single file)",
            detect=detect_sdxl,
            default_size=SDXL_DEFAULT_SIZE,
            generate=generate_sdxl,
        )
    )
