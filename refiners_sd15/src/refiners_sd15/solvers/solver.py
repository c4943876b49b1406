"""`Solver`: what every diffusion solver shares, the noise schedule of Stable Diffusion 1.5 and its timesteps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar, Literal, Self, get_args

import torch

from refiners_core.checks import check_finite

TimestepSpacing = Literal["leading", "linspace", "trailing"]
"""How the inference timesteps are spread over the training ones (Table 2 of arXiv:2305.08891)."""
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
"""The noise schedule settings a solver uses when neither its constructor nor a model gives them: SD1.5's."""


class Solver(ABC):
    """A diffusion solver: the timesteps of a denoising run and the update of the latents from one step to the next.

    A denoising run goes through `inference_steps` (`first_inference_step` to `num_inference_steps - 1`; starting
    later is image-to-image with strength `1 - first_inference_step / num_inference_steps`). At step `i` the UNet
    gets `scale_model_input(x, i)` at timestep `timesteps[i]`, and `step(x, predicted_noise, i)` gives the next
    latents. Text-to-image starts from noise times `init_noise_sigma`, image-to-image from
    `add_noise(latents, noise, first_inference_step)`.

    The noise schedule is SD1.5's: betas on a scaled linear schedule from `beta_start` to `beta_end` over
    `num_train_timesteps`, computed in float32 as diffusers does. Subclasses implement `step` and `add_noise`, and
    may override `timesteps_for` (the spacing of their diffusers counterpart), `init_noise_sigma` and
    `scale_model_input`. Register one with the `refiners_register_solvers` hook to offer it to `refiners generate`.
    """

    default_spacing: ClassVar[TimestepSpacing] = "leading"

    def __init__(
        self,
        num_inference_steps: int,
        *,
        first_inference_step: int = 0,
        timestep_spacing: TimestepSpacing | None = None,
        num_train_timesteps: int | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        steps_offset: int | None = None,
    ) -> None:
        """Settings left to None are the model's: `model.solver = solver` gives them the values of the model's
        scheduler config (`with_defaults(model.solver_defaults)`, SDXL's "leading" spacing), and they are otherwise
        SD1.5's (`SD15_SCHEDULE`, the class's `default_spacing`). Raise ValueError if the number of steps, the first
        step or the spacing is out of range."""
        given = {
            "timestep_spacing": timestep_spacing,
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "steps_offset": steps_offset,
        }
        self.given_settings: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
        """The settings given to the constructor (None is not given): those a model's defaults do not replace."""
        settings = {**SD15_SCHEDULE, "timestep_spacing": self.default_spacing, **self.given_settings}
        train: int = settings["num_train_timesteps"]
        spacing: TimestepSpacing = settings["timestep_spacing"]
        if not 1 <= num_inference_steps <= train:
            raise ValueError(
                f"{type(self).__name__}: num_inference_steps must be between 1 and {train}, got {num_inference_steps}"
            )
        if not 0 <= first_inference_step < num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}: first_inference_step must be between 0 and {num_inference_steps - 1} "
                f"(num_inference_steps - 1), got {first_inference_step}"
            )
        if spacing not in get_args(TimestepSpacing):
            raise ValueError(
                f"{type(self).__name__}: timestep_spacing must be one of {', '.join(get_args(TimestepSpacing))}, "
                f"got {spacing!r}"
            )
        self.num_inference_steps = num_inference_steps
        self.first_inference_step = first_inference_step
        self.timestep_spacing: TimestepSpacing = spacing
        self.num_train_timesteps: int = train
        self.steps_offset: int = settings["steps_offset"]
        start, end = float(settings["beta_start"]), float(settings["beta_end"])
        betas = torch.linspace(start**0.5, end**0.5, train, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        """Cumulative product of `1 - beta` per training timestep (float32)."""
        self.timesteps = self.timesteps_for(spacing)
        """The UNet timestep of each inference step, from the noisiest down."""

    def with_defaults(self, defaults: Mapping[str, Any]) -> Self:
        """This solver with the settings it was not given taken from `defaults` (a model's `solver_defaults`, the
        constructor's keyword arguments its scheduler config gives), as a new solver of the same class; itself when
        `defaults` changes nothing. A subclass whose constructor takes other arguments overrides it."""
        missing = {key: value for key, value in defaults.items() if key not in self.given_settings}
        if not missing:
            return self
        solver = type(self)(
            self.num_inference_steps,
            first_inference_step=self.first_inference_step,
            **{**missing, **self.given_settings},
        )
        solver.given_settings = dict(self.given_settings)  # still the user's: another model may fill the rest
        return solver

    @property
    def inference_steps(self) -> range:
        """The steps of a denoising run: `first_inference_step` to `num_inference_steps - 1`."""
        return range(self.first_inference_step, self.num_inference_steps)

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The standard deviation of the starting noise of text-to-image (noise is drawn with 1 and scaled)."""
        return 1.0

    def scale_model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The UNet's input at `step` (the latents themselves unless the solver says otherwise)."""
        return x

    @abstractmethod
    def step(self, x: torch.Tensor, predicted_noise: torch.Tensor, step: int) -> torch.Tensor:
        """The latents after inference step `step`, from the latents `x` and the noise the UNet predicted."""

    @abstractmethod
    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """Noise clean latents `x` to the level the solver expects at the start of inference step `step`."""

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Integer timesteps (int64), as diffusers' DDIM scheduler spaces them."""
        steps, train = self.num_inference_steps, self.num_train_timesteps
        if spacing == "linspace":
            return linspace(0, train - 1, steps).round().flip(0).to(torch.int64)
        if spacing == "leading":
            return (torch.arange(steps, dtype=torch.int64) * (train // steps)).flip(0) + self.steps_offset
        return trailing_timesteps(train, steps)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """The sigma of each inference step, then 0 (float32), for the solvers that work in sigmas."""
        return self.sigmas_at(self.timesteps)

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise-to-signal ratios `sqrt((1 - alpha_cumprod) / alpha_cumprod)` at `timesteps`, linearly interpolated
        between training timesteps as `numpy.interp` does, followed by a final 0, in float32."""
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).double()
        points = timesteps.double().clamp(0, len(sigmas) - 1)  # beyond the table, the value at its end
        lower = points.floor().long().clamp(max=len(sigmas) - 2)
        fraction = points - lower
        interpolated = (sigmas[lower + 1] - sigmas[lower]) * fraction + sigmas[lower]
        return torch.cat([interpolated, interpolated.new_zeros(1)]).float()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_inference_steps={self.num_inference_steps}, "
            f"first_inference_step={self.first_inference_step}, timestep_spacing={self.timestep_spacing!r})"
        )


def denoising_end_step(solver: Solver, denoising_end: float) -> int:
    """The step where a base model hands over to a refiner (refiners-sdxl's `refiner_first_step`) when it denoises the
    first `denoising_end` fraction of the schedule, as diffusers' `denoising_end` (base) and `denoising_start`
    (refiner): the first of `solver`'s steps whose timestep is below `round((1 - denoising_end) *
    num_train_timesteps)`.

    The base runs `range(solver.first_inference_step, step)`, the refiner a solver of the same kind and settings
    with `first_inference_step=step`, from the base's latents as they are (no noise added). Raises ValueError
    unless `denoising_end` is strictly between 0 and 1, or when the split leaves either model no step.
    """
    check_finite("denoising_end", denoising_end)
    if not 0.0 < denoising_end < 1.0:
        raise ValueError(f"denoising_end must be strictly between 0 and 1, got {denoising_end}")
    cutoff = round(solver.num_train_timesteps - denoising_end * solver.num_train_timesteps)
    step = int((solver.timesteps >= cutoff).sum().item())
    if not solver.first_inference_step < step < solver.num_inference_steps:
        idle = "the base model" if step <= solver.first_inference_step else "the refiner"
        raise ValueError(
            f"denoising_end={denoising_end:g} hands over at step {step} of {solver.num_inference_steps} (timestep "
            f"cutoff {cutoff}, the solver starting at step {solver.first_inference_step}): {idle} would run no step; "
            "use more steps or another fraction"
        )
    return step


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """`round(arange(T, 0, -T / N)) - 1`: the last training timestep first (int64)."""
    ratio = num_train_timesteps / num_inference_steps
    points = torch.tensor([num_train_timesteps - i * ratio for i in range(num_inference_steps)], dtype=torch.float64)
    return points.round().to(torch.int64) - 1


def linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """`num` evenly spaced float64 values from `start` to `stop`, computed as `numpy.linspace` does (as diffusers
    does): `start + i * step`, so that values such as 499.4999... round as they do there."""
    if num == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    values = torch.arange(num, dtype=torch.float64) * step + start
    values[-1] = stop
    return values
