"""The refiners plugin of refiners-sdxl (entry point `sdxl = refiners_sdxl.plugin`).

It registers the `sdxl` model (`StableDiffusion_XL.from_pretrained`) with what `refiners generate` needs to run it
(`detect_sdxl`, 1024x1024 and guidance 5 by default, SDXL's scheduler settings, `generate_sdxl`), and the
`sdxl-refiner` model (`StableDiffusion_XL_Refiner.from_pretrained`) that `--refiner` runs after it; nothing is built or
read here. Solvers are refiners-sd15's,
registered by its plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    from refiners_sdxl.folder import SCHEDULER_DEFAULTS
    from refiners_sdxl.generation import (
        SDXL_DEFAULT_GUIDANCE,
        SDXL_DEFAULT_SIZE,
        detect_sdxl,
        detect_sdxl_refiner,
        generate_sdxl,
    )
    from refiners_sdxl.model import StableDiffusion_XL
    from refiners_sdxl.refiner import StableDiffusion_XL_Refiner

    register(
        ModelSpec(
            name="sdxl",
            loader=StableDiffusion_XL.from_pretrained,
            summary="Stable Diffusion XL (base): StableDiffusion_XL.from_pretrained(diffusers folder, hub id or "
            "single file)",
            detect=detect_sdxl,
            default_size=SDXL_DEFAULT_SIZE,
            generate=generate_sdxl,
            default_guidance=SDXL_DEFAULT_GUIDANCE,
            solver_defaults=SCHEDULER_DEFAULTS,
            refiner="sdxl-refiner",
        )
    )
    register(
        ModelSpec(
            name="sdxl-refiner",
            loader=StableDiffusion_XL_Refiner.from_pretrained,
            summary="Stable Diffusion XL refiner, run after sdxl (refiners generate --refiner): "
            "StableDiffusion_XL_Refiner.from_pretrained(diffusers folder or hub id)",
            detect=detect_sdxl_refiner,
            solver_defaults=SCHEDULER_DEFAULTS,
        )
    )
