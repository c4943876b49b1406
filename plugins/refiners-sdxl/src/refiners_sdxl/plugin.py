"""The refiners plugin of refiners-sdxl (entry point `sdxl = refiners_sdxl.plugin`).

It registers the `sdxl` model (`StableDiffusion_XL.from_pretrained`) with what `refiners generate` needs to run it
(`detect_sdxl`, 1024x1024 and guidance 5 by default, SDXL's scheduler settings, `generate_sdxl`), and the
`sdxl-refiner` model (`StableDiffusion_XL_Refiner.from_pretrained`) that `--refiner` runs after it; nothing is built or
read here. Solvers are refiners-sd15's,
registered by its plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, Reference, hookimpl
from refiners_sdxl.generation_defaults import SCHEDULER_DEFAULTS, SDXL_DEFAULT_GUIDANCE, SDXL_DEFAULT_SIZE


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="sdxl",
            loader=Reference("refiners_sdxl.model:StableDiffusion_XL.from_pretrained"),
            summary="Stable Diffusion XL (base): StableDiffusion_XL.from_pretrained(diffusers folder, hub id or "
            "single file)",
            detect=Reference("refiners_sdxl.generation:detect_sdxl"),
            default_size=SDXL_DEFAULT_SIZE,
            generate=Reference("refiners_sdxl.generation:generate_sdxl"),
            generate_batch=Reference("refiners_sdxl.batch_generation:generate_batch_sdxl"),
            default_guidance=SDXL_DEFAULT_GUIDANCE,
            solver_defaults=SCHEDULER_DEFAULTS,
            refiner="sdxl-refiner",
        )
    )
    register(
        ModelSpec(
            name="sdxl-refiner",
            loader=Reference("refiners_sdxl.refiner:StableDiffusion_XL_Refiner.from_pretrained"),
            summary="Stable Diffusion XL refiner, run after sdxl (refiners generate --refiner): "
            "StableDiffusion_XL_Refiner.from_pretrained(diffusers folder or hub id)",
            detect=Reference("refiners_sdxl.generation:detect_sdxl_refiner"),
            solver_defaults=SCHEDULER_DEFAULTS,
        )
    )
