"""The refiners plugin of refiners-sd15 (entry point `sd15 = refiners_sd15.plugin`)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    from refiners_sd15.model import StableDiffusion_1

    register(
        ModelSpec(
            name="sd15",
            loader=StableDiffusion_1.from_pretrained,
            summary="Stable Diffusion 1.5: StableDiffusion_1.from_pretrained(diffusers folder, hub id or .ckpt)",
        )
    )
