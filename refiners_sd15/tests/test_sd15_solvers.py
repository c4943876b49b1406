# pyright: reportPrivateImportUsage=false
"""Our solvers against diffusers' schedulers as SD1.5 pipelines configure them: timesteps, sigmas, starting noise,
UNet input scaling, step outputs over whole runs and `add_noise`. No UNet: the predicted noise is random.

Timesteps must be identical; latents are compared within 1e-6 of max |reference| (float32, same operations).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from refiners_core.plugins import registry
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.solvers import DDIM, DPMSolver, Euler, Solver
from refiners_sd15.testing import small_sd15_components

TOLERANCE = 1e-6
SD15_BETAS: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def reference(solver: type[Solver], **config: Any) -> Any:
    """The diffusers scheduler that `solver(num_inference_steps=...)` must reproduce, as the issue configures it."""
    if solver is DDIM:
        return DDIMScheduler(**SD15_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **config)
    if solver is DPMSolver:
        return DPMSolverMultistepScheduler(**SD15_BETAS, steps_offset=1, **config)
    return EulerDiscreteScheduler(**SD15_BETAS, steps_offset=1, **config)


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    error = (ours - expected).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), f"max |ours - diffusers| = {error:.3g}"


SOLVERS = [DDIM, DPMSolver, Euler]
STEPS = [1, 2, 3, 7, 10, 20, 30, 50, 999]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
def test_timesteps_and_sigmas_match_diffusers(solver: type[Solver], steps: int, spacing: str | None) -> None:
    config: dict[str, Any] = {} if spacing is None else {"timestep_spacing": spacing}
    scheduler = reference(solver, **config)
    scheduler.set_timesteps(steps)

    ours = solver(steps, **config)

    assert ours.timesteps.dtype == scheduler.timesteps.dtype
    assert torch.equal(ours.timesteps, scheduler.timesteps)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(scheduler.init_noise_sigma))
    if isinstance(ours, DPMSolver | Euler):
        assert torch.equal(ours.sigmas, scheduler.sigmas)


def test_defaults_are_the_diffusers_defaults() -> None:
    assert (DDIM(10).timestep_spacing, DPMSolver(10).timestep_spacing, Euler(10).timestep_spacing) == (
        "leading",
        "linspace",
        "linspace",
    )
    assert torch.equal(DDIM(10).alphas_cumprod, reference(DDIM).alphas_cumprod)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 30])
@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_a_whole_run_matches_diffusers_step_by_step(solver: type[Solver], steps: int, spacing: str | None) -> None:
    config: dict[str, Any] = {} if spacing is None else {"timestep_spacing": spacing}
    scheduler = reference(solver, **config)
    scheduler.set_timesteps(steps)
    ours = solver(steps, **config)
    generator = torch.Generator().manual_seed(steps)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    expected = noise * scheduler.init_noise_sigma
    x = noise * ours.init_noise_sigma
    assert_close(x, expected)

    for step, timestep in zip(ours.inference_steps, scheduler.timesteps, strict=True):
        predicted_noise = torch.randn(2, 4, 8, 8, generator=generator)
        assert_close(ours.scale_model_input(x, step), scheduler.scale_model_input(expected, timestep))
        expected = scheduler.step(predicted_noise, timestep, expected).prev_sample
        x = ours.step(x, predicted_noise, step)
        assert_close(x, expected)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize(("steps", "first_step"), [(10, 3), (30, 12), (4, 3)])
def test_image_to_image_run_matches_diffusers_started_at_its_first_step(
    solver: type[Solver], steps: int, first_step: int
) -> None:
    """As diffusers' img2img pipeline: timesteps from `first_step`, `set_begin_index`, `add_noise` at that step."""
    scheduler = reference(solver)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[first_step:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first_step)
    ours = solver(steps, first_inference_step=first_step)
    generator = torch.Generator().manual_seed(first_step)
    latents, noise = torch.randn(2, 1, 4, 8, 8, generator=generator)
    expected = scheduler.add_noise(latents, noise, timesteps[:1])
    x = ours.add_noise(latents, noise, first_step)
    assert_close(x, expected)

    assert list(ours.inference_steps) == list(range(first_step, steps))
    for step, timestep in zip(ours.inference_steps, timesteps, strict=True):
        predicted_noise = torch.randn(1, 4, 8, 8, generator=generator)
        assert_close(ours.scale_model_input(x, step), scheduler.scale_model_input(expected, timestep))
        expected = scheduler.step(predicted_noise, timestep, expected).prev_sample
        x = ours.step(x, predicted_noise, step)
        assert_close(x, expected)


def test_dpm_solver_starts_a_second_run_afresh() -> None:
    solver = DPMSolver(5)
    generator = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(5)]

    def run() -> torch.Tensor:
        x = torch.ones(1, 4, 8, 8)
        for step in solver.inference_steps:
            x = solver.step(x, noises[step], step)
        return x

    assert torch.equal(run(), run())


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_steps_keep_the_latents_dtype(solver: type[Solver]) -> None:
    ours = solver(3)
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    for step in ours.inference_steps:
        x = ours.step(x, torch.randn_like(x), step)
    assert x.dtype == torch.bfloat16
    assert ours.add_noise(x, torch.randn_like(x), 0).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000, got 0"),
        ({"num_inference_steps": 1001}, "num_inference_steps must be between 1 and 1000, got 1001"),
        ({"num_inference_steps": 10, "first_inference_step": 10}, "first_inference_step must be between 0 and 9"),
        ({"num_inference_steps": 10, "timestep_spacing": "uniform"}, "timestep_spacing must be one of"),
    ],
)
def test_invalid_settings_are_refused_with_the_solver_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"DPMSolver: {message}"):
        DPMSolver(**kwargs)


def test_solvers_are_registered_with_the_plugin_manager() -> None:
    solvers = registry(reload=True).solvers
    built = {name: solvers[name].factory(num_inference_steps=4) for name in ("ddim", "dpm", "euler")}
    assert {name: type(solver) for name, solver in built.items()} == {"ddim": DDIM, "dpm": DPMSolver, "euler": Euler}
    assert built["dpm"].num_inference_steps == 4


@pytest.mark.parametrize("solver", [DDIM, DPMSolver, Euler])
def test_with_defaults_fills_only_the_settings_the_solver_was_not_given(solver: type[Solver]) -> None:
    given = solver(num_inference_steps=10, first_inference_step=2, timestep_spacing="trailing")
    model_defaults = {"timestep_spacing": "leading", "steps_offset": 0, "beta_end": 0.02}

    filled = given.with_defaults(model_defaults)

    assert type(filled) is solver and filled is not given
    assert (filled.num_inference_steps, filled.first_inference_step) == (10, 2)
    assert (filled.timestep_spacing, filled.steps_offset) == ("trailing", 0)  # the spacing given is kept
    assert not torch.equal(filled.alphas_cumprod, given.alphas_cumprod)  # beta_end 0.02
    assert filled.given_settings == {"timestep_spacing": "trailing"}
    assert given.with_defaults({}) is given  # SD1.5 models: no defaults, the solver itself


def test_a_solver_set_on_an_sd15_model_is_kept_as_it_is() -> None:
    sd = StableDiffusion_1(**small_sd15_components(4))  # pyright: ignore[reportArgumentType]
    solver = Euler(num_inference_steps=5)

    sd.solver = solver

    assert sd.solver is solver and sd.solver.timestep_spacing == "linspace"
