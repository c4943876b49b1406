# pyright: reportPrivateImportUsage=false
"""Every solver against its diffusers scheduler, step by step, over a 3-step classifier-free guidance run of a small
SD1.5 (`refiners_sd15.testing.small_sd15_components`, random weights, 8x8 latents).

The reference loop is diffusers' pipeline loop (`scale_model_input`, the UNet with guidance 7.5, `scheduler.step`)
with our UNet's guided prediction, starting from the same noise; stochastic solvers and schedulers get generators
seeded alike. After every model evaluation the latents must agree within 1e-4 of max |reference| (float32), for each
prediction type (the UNet's output read as noise, velocity or clean latents).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from refiners_core.testing import assert_relative_close
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.solvers import (
    DDIM,
    DDPM,
    LCM,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerAncestral,
    Heun,
    PredictionType,
    Solver,
    StochasticSolver,
)
from refiners_sd15.testing import SD15_SCHEDULER_CONFIG, small_sd15_components

TOLERANCE = 1e-4
STEPS = 3
GUIDANCE = 7.5
NO_CLIP: dict[str, Any] = {"clip_sample": False}

Case = tuple[Callable[..., Solver], Callable[..., Any]]
CASES: dict[str, Case] = {
    "ddim": (DDIM, lambda **c: DDIMScheduler(**SD15_SCHEDULER_CONFIG, **NO_CLIP, set_alpha_to_one=False, **c)),
    "ddim-linear-betas": (
        lambda n, **o: DDIM(n, noise_schedule="linear", beta_start=0.0001, beta_end=0.02, **o),
        lambda **c: DDIMScheduler(**NO_CLIP, set_alpha_to_one=False, steps_offset=1, **c),
    ),
    "ddpm": (DDPM, lambda **c: DDPMScheduler(**SD15_SCHEDULER_CONFIG, **NO_CLIP, **c)),
    "lcm": (LCM, lambda **c: LCMScheduler(**SD15_SCHEDULER_CONFIG, **NO_CLIP, set_alpha_to_one=True, **c)),
    "dpm": (DPMSolver, lambda **c: DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "dpm-karras": (
        lambda n, **o: DPMSolver(n, sigma_schedule="karras", **o),
        lambda **c: DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, **c),
    ),
    "dpm-exponential-trailing": (
        lambda n, **o: DPMSolver(n, sigma_schedule="exponential", timestep_spacing="trailing", **o),
        lambda **c: DPMSolverMultistepScheduler(
            **SD15_SCHEDULER_CONFIG, use_exponential_sigmas=True, timestep_spacing="trailing", **c
        ),
    ),
    "dpm-second-order-final-step": (
        lambda n, **o: DPMSolver(n, final_step_first_order=False, **o),
        lambda **c: DPMSolverMultistepScheduler(
            **SD15_SCHEDULER_CONFIG, final_sigmas_type="sigma_min", lower_order_final=False, **c
        ),
    ),
    "dpm-sde-karras": (
        lambda n, **o: DPMSolverSDE(n, sigma_schedule="karras", **o),
        lambda **c: DPMSolverMultistepScheduler(
            **SD15_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **c
        ),
    ),
    "euler": (Euler, lambda **c: EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "euler-karras-leading": (
        lambda n, **o: Euler(n, sigma_schedule="karras", timestep_spacing="leading", **o),
        lambda **c: EulerDiscreteScheduler(
            **SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, timestep_spacing="leading", **c
        ),
    ),
    "euler-ancestral": (EulerAncestral, lambda **c: EulerAncestralDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "heun": (Heun, lambda **c: HeunDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "heun-karras": (
        lambda n, **o: Heun(n, sigma_schedule="karras", **o),
        lambda **c: HeunDiscreteScheduler(**SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, **c),
    ),
}


@pytest.fixture(scope="module")
def sd() -> StableDiffusion_1:
    return StableDiffusion_1(**small_sd15_components(4), show_progress=False)  # pyright: ignore[reportArgumentType]


@pytest.fixture(scope="module")
def embedding() -> torch.Tensor:
    return torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))


UNSUPPORTED = {("euler-ancestral", PredictionType.SAMPLE)}
"""diffusers' EulerAncestralDiscreteScheduler refuses "sample" (ours reads it with Euler's `clean_latents`)."""


@pytest.mark.parametrize(
    ("case", "prediction_type"),
    [(case, kind) for kind in PredictionType for case in CASES if (case, kind) not in UNSUPPORTED],
    ids=lambda value: str(value),
)
def test_a_guided_run_matches_the_diffusers_scheduler_step_by_step(
    sd: StableDiffusion_1, embedding: torch.Tensor, case: str, prediction_type: PredictionType
) -> None:
    ours_factory, reference_factory = CASES[case]
    scheduler = reference_factory(prediction_type=str(prediction_type))
    scheduler.set_timesteps(STEPS)
    solver = ours_factory(STEPS, prediction_type=prediction_type)
    stochastic = isinstance(solver, StochasticSolver)
    if stochastic:
        solver = solver.with_settings(generator=torch.Generator().manual_seed(2))
    reference_generator = {"generator": torch.Generator().manual_seed(2)} if stochastic else {}
    sd.solver = solver

    with torch.no_grad():
        x = sd.init_latents(size=(64, 64), seed=0)
        expected = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        assert_relative_close(x, expected, TOLERANCE, what="starting latents")
        start = x
        steps = list(sd.steps)
        assert len(steps) == len(scheduler.timesteps)
        for step, timestep in zip(steps, scheduler.timesteps, strict=True):
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=GUIDANCE)
            model_input = scheduler.scale_model_input(expected, timestep)
            output = sd.compute_noise(model_input, timestep, embedding, GUIDANCE)
            expected = scheduler.step(output, timestep, expected, **reference_generator).prev_sample
            assert_relative_close(x, expected, TOLERANCE, what=f"after step {step} (timestep {float(timestep):g})")

    assert (x - start).abs().max() > 0.1 * start.abs().max()  # the run moved the latents: the check means something


@pytest.mark.parametrize("case", ["ddpm", "lcm", "dpm-sde-karras", "euler-ancestral"])
def test_a_stochastic_solver_draws_its_noise_from_its_generator(
    sd: StableDiffusion_1, embedding: torch.Tensor, case: str
) -> None:
    def run(seed: int) -> torch.Tensor:
        sd.solver = CASES[case][0](STEPS, seed=seed)
        with torch.no_grad():
            x = sd.init_latents(size=(64, 64), seed=0)
            for step in sd.steps:
                x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=GUIDANCE)
        return x

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_a_solver_refuses_both_a_generator_and_a_seed() -> None:
    with pytest.raises(ValueError, match="DDPM: give a generator or a seed, not both"):
        DDPM(3, generator=torch.Generator(), seed=1)
