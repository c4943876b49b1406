# pyright: reportPrivateImportUsage=false
"""Our solvers against diffusers' schedulers as SD1.5 pipelines configure them: timesteps, sigmas, starting noise,
UNet input scaling, step outputs over whole runs and `add_noise`. No UNet: the predicted noise is random.

Timesteps must be identical; latents are compared within 1e-6 of max |reference| (float32, same operations).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from refiners_core.cli import main
from refiners_core.plugins import registry
from refiners_core.testing import assert_relative_close
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.cli import solver_name
from refiners_sd15.plugin import SOLVER_ALIASES
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
    denoising_end_step,
)
from refiners_sd15.testing import SD15_SCHEDULER_CONFIG, diffusers_reference_scheduler, small_sd15_components

TOLERANCE = 1e-6


def reference(solver: type[Solver], **config: Any) -> Any:
    """The diffusers scheduler that `solver(num_inference_steps=...)` must reproduce, as the issue configures it."""
    return diffusers_reference_scheduler({DDIM: "ddim", DPMSolver: "dpm", Euler: "euler"}[solver], **config)


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
    assert_relative_close(x, expected, TOLERANCE)

    for step, timestep in zip(ours.inference_steps, scheduler.timesteps, strict=True):
        predicted_noise = torch.randn(2, 4, 8, 8, generator=generator)
        assert_relative_close(
            ours.scale_model_input(x, step), scheduler.scale_model_input(expected, timestep), TOLERANCE
        )
        expected = scheduler.step(predicted_noise, timestep, expected).prev_sample
        x = ours.step(x, predicted_noise, step)
        assert_relative_close(x, expected, TOLERANCE)


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
    assert_relative_close(x, expected, TOLERANCE)

    assert list(ours.inference_steps) == list(range(first_step, steps))
    for step, timestep in zip(ours.inference_steps, timesteps, strict=True):
        predicted_noise = torch.randn(1, 4, 8, 8, generator=generator)
        assert_relative_close(
            ours.scale_model_input(x, step), scheduler.scale_model_input(expected, timestep), TOLERANCE
        )
        expected = scheduler.step(predicted_noise, timestep, expected).prev_sample
        x = ours.step(x, predicted_noise, step)
        assert_relative_close(x, expected, TOLERANCE)


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


def test_every_solver_name_and_alias_is_registered_and_listed_by_refiners_plugins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    solvers = registry(reload=True).solvers
    expected: dict[str, tuple[type[Solver], str | None]] = {
        "ddim": (DDIM, None),
        "dpm": (DPMSolver, None),
        "euler": (Euler, None),
        "ddpm": (DDPM, None),
        "lcm": (LCM, None),
        "euler-a": (EulerAncestral, None),
        "heun": (Heun, None),
        "dpm++2m-karras": (DPMSolver, "karras"),
        "dpm++2m-sde": (DPMSolverSDE, None),
        "dpm++2m-sde-karras": (DPMSolverSDE, "karras"),
    }
    built = {name: solvers[name].factory(num_inference_steps=4) for name in [*expected, *SOLVER_ALIASES]}
    assert {name: (type(built[name]), built[name].sigma_schedule) for name in expected} == expected
    for alias, name in SOLVER_ALIASES.items():
        assert (type(built[alias]), built[alias].sigma_schedule) == expected[name]
        assert solvers[alias].summary == f"alias of {name}"
    assert solver_name("DPM++ 2M Karras") in SOLVER_ALIASES and solver_name(" Euler  a ") == "euler-a"

    assert main(["plugins", "--json"]) == 0
    listed = {item["distribution"]: item for item in json.loads(capsys.readouterr().out)}["refiners-sd15"]["solvers"]
    assert set(listed) == {*expected, *SOLVER_ALIASES}


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


NEW_SOLVERS: dict[str, tuple[Any, Any]] = {
    "ddpm": (DDPM, lambda **c: DDPMScheduler(**SD15_SCHEDULER_CONFIG, clip_sample=False, **c)),
    "lcm": (LCM, lambda **c: LCMScheduler(**SD15_SCHEDULER_CONFIG, clip_sample=False, **c)),
    "euler-a": (EulerAncestral, lambda **c: EulerAncestralDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "heun": (Heun, lambda **c: HeunDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **c)),
    "heun-karras": (
        lambda n, **o: Heun(n, sigma_schedule="karras", **o),
        lambda **c: HeunDiscreteScheduler(**SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, **c),
    ),
    "euler-karras": (
        lambda n, **o: Euler(n, sigma_schedule="karras", **o),
        lambda **c: EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, **c),
    ),
    "euler-exponential": (
        lambda n, **o: Euler(n, sigma_schedule="exponential", **o),
        lambda **c: EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG, use_exponential_sigmas=True, **c),
    ),
    "dpm-karras": (
        lambda n, **o: DPMSolver(n, sigma_schedule="karras", **o),
        lambda **c: DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, use_karras_sigmas=True, **c),
    ),
    "dpm-exponential": (
        lambda n, **o: DPMSolver(n, sigma_schedule="exponential", **o),
        lambda **c: DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, use_exponential_sigmas=True, **c),
    ),
    "dpm-sigma-min": (
        lambda n, **o: DPMSolver(n, final_step_first_order=False, **o),
        lambda **c: DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, final_sigmas_type="sigma_min", **c),
    ),
}


@pytest.mark.parametrize("case", NEW_SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 30])
@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
def test_timesteps_and_sigmas_of_the_new_solvers_and_schedules_match_diffusers(
    case: str, steps: int, spacing: str | None
) -> None:
    """Integer timesteps must be equal, fractional ones (Karras, exponential) and sigmas within 1e-6 relative."""
    ours_factory, reference_factory = NEW_SOLVERS[case]
    config: dict[str, Any] = {} if spacing is None else {"timestep_spacing": spacing}
    scheduler = reference_factory(**config)
    scheduler.set_timesteps(steps)

    ours = ours_factory(steps, **config)

    assert ours.timesteps.dtype == scheduler.timesteps.dtype
    assert torch.allclose(ours.timesteps.double(), scheduler.timesteps.double(), rtol=1e-6, atol=0)
    assert len(ours.inference_steps) == len(scheduler.timesteps)
    assert torch.allclose(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(scheduler.init_noise_sigma))
    if ours.uses_sigmas:
        assert torch.allclose(ours.sigmas, scheduler.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver", [DDPM, LCM])
def test_add_noise_of_the_new_timestep_solvers_matches_diffusers(solver: type[Solver]) -> None:
    scheduler = NEW_SOLVERS[solver.__name__.lower()][1]()
    scheduler.set_timesteps(4)
    latents, noise = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_relative_close(
        solver(4).add_noise(latents, noise, 1), scheduler.add_noise(latents, noise, scheduler.timesteps[1:2]), TOLERANCE
    )


def test_settings_are_checked_and_named() -> None:
    with pytest.raises(ValueError, match="DDIM: sigma_schedule 'karras' needs a solver that works in sigmas"):
        DDIM(10, sigma_schedule="karras")
    with pytest.raises(
        ValueError, match="Euler: prediction_type must be one of epsilon, v_prediction, sample, got 'v'"
    ):
        Euler(10, prediction_type="v")
    with pytest.raises(ValueError, match="DPMSolver: noise_schedule must be one of linear, scaled_linear"):
        DPMSolver(10, noise_schedule="cosine")
    with pytest.raises(ValueError, match="LCM: original_steps must be from num_inference_steps"):
        LCM(8, original_steps=4)
    assert DDIM(10, prediction_type="v_prediction").prediction_type is PredictionType.V_PREDICTION


def test_heun_lists_every_model_evaluation_and_refuses_a_refiner_split() -> None:
    solver = Heun(4, first_inference_step=1)

    assert len(solver.timesteps) == 7 and list(solver.inference_steps) == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="Heun evaluates the model 7 times for 4 steps"):
        denoising_end_step(solver, 0.8)
    with pytest.raises(ValueError, match="Heun: evaluation 3 corrects evaluation 2"):
        solver.step(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), 3)


def test_with_defaults_keeps_the_options_of_new_solvers() -> None:
    generator = torch.Generator()
    solver = DPMSolverSDE(10, generator=generator, sigma_schedule="karras", final_step_first_order=False)

    filled = solver.with_defaults({"timestep_spacing": "leading", "prediction_type": "v_prediction"})

    assert (filled.generator, filled.sigma_schedule, filled.final_step_first_order) == (generator, "karras", False)
    assert (filled.timestep_spacing, filled.prediction_type) == ("leading", "v_prediction")


@pytest.mark.parametrize("case", ["ddpm", "euler-a", "heun", "heun-karras", "dpm-sde-karras"])
@pytest.mark.parametrize(("steps", "first_step"), [(10, 3), (4, 3)])
def test_image_to_image_runs_of_the_new_solvers_match_diffusers(case: str, steps: int, first_step: int) -> None:
    """As diffusers' img2img pipeline: timesteps from `first_step * order` (Heun lists 2 evaluations per step),
    `set_begin_index`, `add_noise` at that timestep; stochastic schedulers get a generator seeded as ours."""
    cases = {**NEW_SOLVERS, "dpm-sde-karras": IMG2IMG_SDE}
    ours_factory, reference_factory = cases[case]
    scheduler = reference_factory()
    scheduler.set_timesteps(steps)
    begin = first_step * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):  # DDPM finds its step from the timestep
        scheduler.set_begin_index(begin)
    ours = ours_factory(steps, first_inference_step=first_step)
    stochastic = isinstance(ours, StochasticSolver)
    if stochastic:
        ours = ours.with_settings(generator=torch.Generator().manual_seed(5))
    step_options = {"generator": torch.Generator().manual_seed(5)} if stochastic else {}
    generator = torch.Generator().manual_seed(first_step)
    latents, noise = torch.randn(2, 1, 4, 8, 8, generator=generator)
    expected = scheduler.add_noise(latents, noise, timesteps[:1])
    x = ours.add_noise(latents, noise, first_step)
    assert_relative_close(x, expected, TOLERANCE)

    assert len(ours.inference_steps) == len(timesteps)
    for step, timestep in zip(ours.inference_steps, timesteps, strict=True):
        predicted_noise = torch.randn(1, 4, 8, 8, generator=generator)
        assert_relative_close(
            ours.scale_model_input(x, step), scheduler.scale_model_input(expected, timestep), TOLERANCE
        )
        expected = scheduler.step(predicted_noise, timestep, expected, **step_options).prev_sample
        x = ours.step(x, predicted_noise, step)
        assert_relative_close(x, expected, TOLERANCE)


IMG2IMG_SDE: tuple[Any, Any] = (
    lambda n, **o: DPMSolverSDE(n, sigma_schedule="karras", **o),
    lambda **c: DPMSolverMultistepScheduler(
        **SD15_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **c
    ),
)
