"""The refiners plugin of refiners-sd15 (entry point `sd15 = refiners_sd15.plugin`).

It registers the `sd15` model (with the `refiners demo` it offers and what `refiners generate` needs), the `ddim`,
`dpm` and `euler` solvers and the `refiners generate` command; nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import CommandRegistrar, ModelSpec, SolverSpec, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    from refiners_sd15.demo import run_demo
    from refiners_sd15.generation import SD15_DEFAULT_GUIDANCE, SD15_DEFAULT_SIZE, detect_sd15, generate_sd15
    from refiners_sd15.model import StableDiffusion_1

    register(
        ModelSpec(
            name="sd15",
            loader=StableDiffusion_1.from_pretrained,
            summary="Stable Diffusion 1.5: StableDiffusion_1.from_pretrained(diffusers folder, hub id or .ckpt)",
            demo=run_demo,
            detect=detect_sd15,
            default_size=SD15_DEFAULT_SIZE,
            generate=generate_sd15,
            default_guidance=SD15_DEFAULT_GUIDANCE,
        )
    )


@hookimpl
def refiners_register_solvers(register: Callable[[SolverSpec], None]) -> None:
    from refiners_sd15.solvers import DDIM, DPMSolver, Euler

    register(SolverSpec("ddim", DDIM, summary="DDIM (eta = 0), as diffusers' DDIMScheduler"))
    register(SolverSpec("dpm", DPMSolver, summary="DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler"))
    register(SolverSpec("euler", Euler, summary="Euler, as diffusers' EulerDiscreteScheduler"))


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    from refiners_sd15 import cli as generate

    cli.add_command(
        "generate",
        generate.run,
        help="Generate an image with an installed model (sd15, sdxl...): text-to-image, image-to-image, inpainting",
        configure=generate.configure,
    )
