"""The refiners plugin of refiners-sd15 (entry point `sd15 = refiners_sd15.plugin`).

It registers the `sd15` model (with the `refiners demo` it offers and what `refiners generate` needs), the `ddim`,
`dpm` and `euler` solvers and the `refiners generate` command; nothing is built, read or imported here: the
references are imported on first use, so the plugin registers without torch.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import CommandRegistrar, ModelSpec, Reference, SolverSpec, hookimpl
from refiners_sd15.generation_defaults import SD15_DEFAULT_GUIDANCE, SD15_DEFAULT_SIZE


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="sd15",
            loader=Reference("refiners_sd15.model:StableDiffusion_1.from_pretrained"),
            summary="Stable Diffusion 1.5: StableDiffusion_1.from_pretrained(diffusers folder, hub id or .ckpt)",
            demo=Reference("refiners_sd15.demo:run_demo"),
            detect=Reference("refiners_sd15.generation:detect_sd15"),
            default_size=SD15_DEFAULT_SIZE,
            generate=Reference("refiners_sd15.generation:generate_sd15"),
            default_guidance=SD15_DEFAULT_GUIDANCE,
        )
    )


@hookimpl
def refiners_register_solvers(register: Callable[[SolverSpec], None]) -> None:
    solvers = "refiners_sd15.solvers"
    register(SolverSpec("ddim", Reference(f"{solvers}:DDIM"), summary="DDIM (eta = 0), as diffusers' DDIMScheduler"))
    register(
        SolverSpec(
            "dpm",
            Reference(f"{solvers}:DPMSolver"),
            summary="DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler",
        )
    )
    register(SolverSpec("euler", Reference(f"{solvers}:Euler"), summary="Euler, as diffusers' EulerDiscreteScheduler"))


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    cli.add_command(
        "generate",
        Reference("refiners_sd15.cli:run"),
        help="Generate an image with an installed model (sd15, sdxl...): text-to-image, image-to-image, inpainting",
        configure=Reference("refiners_sd15.cli:configure"),
    )
