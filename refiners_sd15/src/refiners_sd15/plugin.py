"""The refiners plugin of refiners-sd15 (entry point `sd15 = refiners_sd15.plugin`).

It registers the `sd15` model (with the `refiners demo` it offers and what `refiners generate` needs), the solvers
(`ddim`, `dpm`, `euler`, `ddpm`, `lcm`, `euler-a`, `heun`, `dpm++2m-karras`, `dpm++2m-sde`, `dpm++2m-sde-karras`,
and `SOLVER_ALIASES`, their A1111 and ComfyUI names) and the `refiners generate` command. Nothing is built, read or
imported here: the references are imported on first use, so the plugin registers without torch.
"""

from __future__ import annotations

import functools
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
            generate_batch=Reference("refiners_sd15.batch_generation:generate_batch_sd15"),
            default_guidance=SD15_DEFAULT_GUIDANCE,
        )
    )


SOLVER_ALIASES: dict[str, str] = {
    "dpm++2m": "dpm",
    "dpmpp_2m": "dpm",
    "dpm++-2m-karras": "dpm++2m-karras",
    "dpmpp_2m_karras": "dpm++2m-karras",
    "dpmpp_2m_sde": "dpm++2m-sde",
    "dpm++-2m-sde": "dpm++2m-sde",
    "dpm++-2m-sde-karras": "dpm++2m-sde-karras",
    "dpmpp_2m_sde_karras": "dpm++2m-sde-karras",
    "euler_ancestral": "euler-a",
    "euler-ancestral": "euler-a",
    "k_euler_a": "euler-a",
    "k_euler": "euler",
    "k_heun": "heun",
}
"""Other names of the solvers, as A1111 and ComfyUI spell them (`refiners generate --solver` lowercases a name and
joins its words with '-': A1111's "DPM++ 2M Karras" is `dpm++-2m-karras`, "Euler a" is `euler-a`) -> our name."""


@hookimpl
def refiners_register_solvers(register: Callable[[SolverSpec], None]) -> None:
    def solver(name: str) -> Reference:
        return Reference(f"refiners_sd15.solvers:{name}")

    karras = "karras"  # a SigmaSchedule, given by its value so that nothing is imported here
    specs = [
        SolverSpec("ddim", solver("DDIM"), summary="DDIM (eta = 0), as diffusers' DDIMScheduler"),
        SolverSpec("dpm", solver("DPMSolver"), summary="DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler"),
        SolverSpec("euler", solver("Euler"), summary="Euler, as diffusers' EulerDiscreteScheduler"),
        SolverSpec("ddpm", solver("DDPM"), summary="DDPM (stochastic), as diffusers' DDPMScheduler"),
        SolverSpec(
            "lcm", solver("LCM"), summary="latent consistency (stochastic, for LCM-LoRA), as diffusers' LCMScheduler"
        ),
        SolverSpec(
            "euler-a",
            solver("EulerAncestral"),
            summary="Euler ancestral (stochastic), as EulerAncestralDiscreteScheduler",
        ),
        SolverSpec(
            "heun", solver("Heun"), summary="Heun (2 model evaluations per step), as diffusers' HeunDiscreteScheduler"
        ),
        SolverSpec(
            "dpm++2m-karras",
            functools.partial(solver("DPMSolver"), sigma_schedule=karras),
            summary="DPM-Solver++(2M) with Karras sigmas (A1111's DPM++ 2M Karras)",
        ),
        SolverSpec(
            "dpm++2m-sde",
            solver("DPMSolverSDE"),
            summary="DPM-Solver++ 2M SDE (stochastic), as diffusers' sde-dpmsolver++",
        ),
        SolverSpec(
            "dpm++2m-sde-karras",
            functools.partial(solver("DPMSolverSDE"), sigma_schedule=karras),
            summary="DPM-Solver++ 2M SDE with Karras sigmas (A1111's DPM++ 2M SDE Karras)",
        ),
    ]
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        register(spec)
    for alias, name in SOLVER_ALIASES.items():
        register(SolverSpec(alias, by_name[name].factory, summary=f"alias of {name}"))


@hookimpl
def refiners_register_commands(cli: CommandRegistrar) -> None:
    cli.add_command(
        "generate",
        Reference("refiners_sd15.generate_many:run"),
        help="Generate an image with an installed model (sd15, sdxl...): text-to-image, image-to-image, inpainting",
        configure=Reference("refiners_sd15.cli:configure"),
    )
