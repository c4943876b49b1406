"""`Solver`: what every diffusion solver shares: the noise schedule, the timesteps and sigmas of a run, the reading
of the model's prediction and, for stochastic solvers, the noise drawn at each step."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self

import torch

from refiners_core.checks import check_finite


class TimestepSpacing(StrEnum):
    """How the inference timesteps are spread over the training ones (Table 2 of arXiv:2305.08891), as diffusers'
    `timestep_spacing`."""

    LINSPACE = "linspace"
    LEADING = "leading"
    TRAILING = "trailing"


class NoiseSchedule(StrEnum):
    """The betas of training, as diffusers' `beta_schedule`: linear, or linear in `sqrt(beta)` (Stable Diffusion's)."""

    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"


class SigmaSchedule(StrEnum):
    """Sigmas of a run spaced on their own, the timesteps following them (diffusers' `use_karras_sigmas`,
    `use_exponential_sigmas`): Karras et al.'s rho = 7 ramp (arXiv:2206.00364) or evenly in log sigma. Only for the
    solvers that work in sigmas."""

    KARRAS = "karras"
    EXPONENTIAL = "exponential"


class PredictionType(StrEnum):
    """What the model predicts, as diffusers' `prediction_type`: the noise, the velocity `alpha * noise - sigma *
    x0` (arXiv:2202.00512, SD2's 768 models and v-prediction fine-tunes) or the clean latents."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "noise_schedule": NoiseSchedule.SCALED_LINEAR,
    "prediction_type": PredictionType.EPSILON,
}
"""The noise schedule settings a solver uses when neither its constructor nor a model gives them: SD1.5's."""
_ENUMS: dict[str, type[StrEnum]] = {
    "timestep_spacing": TimestepSpacing,
    "noise_schedule": NoiseSchedule,
    "sigma_schedule": SigmaSchedule,
    "prediction_type": PredictionType,
}


class Solver(ABC):
    """A diffusion solver: the timesteps of a denoising run and the update of the latents from one step to the next.

    A denoising run goes through `inference_steps` (`first_inference_step` to `num_inference_steps - 1`; starting
    later is image-to-image with strength `1 - first_inference_step / num_inference_steps`). At step `i` the UNet
    gets `scale_model_input(x, i)` at timestep `timesteps[i]`, and `step(x, model_output, i)` gives the next
    latents. Text-to-image starts from noise times `init_noise_sigma`, image-to-image from
    `add_noise(latents, noise, first_inference_step)`. A solver that evaluates the model more than once per step
    (`Heun`) has more `timesteps` than steps: its `inference_steps` index them, and loops over `inference_steps`
    work unchanged.

    The betas of training follow `noise_schedule` from `beta_start` to `beta_end` over `num_train_timesteps`
    (float32, as diffusers); `prediction_type` says how `step` reads the model's output; `sigma_schedule` respaces
    the sigmas of the solvers that work in sigmas (`uses_sigmas`). Subclasses implement `step` and `add_noise`, and
    may override `timesteps_for` (the spacing of their diffusers counterpart), `init_noise_sigma` and
    `scale_model_input`. Register one with the `refiners_register_solvers` hook to offer it to `refiners generate`.
    """

    default_spacing: ClassVar[TimestepSpacing] = TimestepSpacing.LEADING
    uses_sigmas: ClassVar[bool] = False
    """Whether the solver works in sigmas (`sigmas`, `sigma_schedule`), not only in `alphas_cumprod`."""

    def __init__(
        self,
        num_inference_steps: int,
        *,
        first_inference_step: int = 0,
        timestep_spacing: TimestepSpacing | str | None = None,
        num_train_timesteps: int | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        steps_offset: int | None = None,
        noise_schedule: NoiseSchedule | str | None = None,
        sigma_schedule: SigmaSchedule | str | None = None,
        prediction_type: PredictionType | str | None = None,
    ) -> None:
        """Settings left to None are the model's: `model.solver = solver` gives them the values of the model's
        scheduler config (`with_defaults(model.solver_defaults)`, SDXL's "leading" spacing), and they are otherwise
        SD1.5's (`SD15_SCHEDULE`, the class's `default_spacing`, no `sigma_schedule`). Enum settings take their
        values as strings too. Raise ValueError, naming the solver and the setting, if the number of steps or the
        first step is out of range, an enum setting has an unknown value, or a `sigma_schedule` is given to a solver
        that does not work in sigmas."""
        given = {
            "timestep_spacing": timestep_spacing,
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "steps_offset": steps_offset,
            "noise_schedule": noise_schedule,
            "sigma_schedule": sigma_schedule,
            "prediction_type": prediction_type,
        }
        self.given_settings: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
        """The settings given to the constructor (None is not given): those a model's defaults do not replace."""
        settings: dict[str, Any] = {**SD15_SCHEDULE, "timestep_spacing": self.default_spacing, **self.given_settings}
        for key, enum in _ENUMS.items():
            if settings.get(key) is not None:
                settings[key] = self._enum(key, enum, settings[key])
        train: int = settings["num_train_timesteps"]
        if not 1 <= num_inference_steps <= train:
            raise ValueError(
                f"{type(self).__name__}: num_inference_steps must be between 1 and {train}, got {num_inference_steps}"
            )
        if not 0 <= first_inference_step < num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}: first_inference_step must be between 0 and {num_inference_steps - 1} "
                f"(num_inference_steps - 1), got {first_inference_step}"
            )
        if settings.get("sigma_schedule") is not None and not self.uses_sigmas:
            raise ValueError(
                f"{type(self).__name__}: sigma_schedule {str(settings['sigma_schedule'])!r} needs a solver that works "
                "in sigmas (Euler, EulerAncestral, Heun, DPMSolver, DPMSolverSDE)"
            )
        self.num_inference_steps = num_inference_steps
        self.first_inference_step = first_inference_step
        self.timestep_spacing: TimestepSpacing = settings["timestep_spacing"]
        self.noise_schedule: NoiseSchedule = settings["noise_schedule"]
        self.sigma_schedule: SigmaSchedule | None = settings.get("sigma_schedule")
        self.prediction_type: PredictionType = settings["prediction_type"]
        self.num_train_timesteps: int = train
        self.steps_offset: int = settings["steps_offset"]
        start, end = float(settings["beta_start"]), float(settings["beta_end"])
        if self.noise_schedule == NoiseSchedule.LINEAR:
            betas = torch.linspace(start, end, train, dtype=torch.float32)
        else:
            betas = torch.linspace(start**0.5, end**0.5, train, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        """Cumulative product of `1 - beta` per training timestep (float32)."""
        timesteps = self.timesteps_for(self.timestep_spacing)
        sigmas = self.sigmas_at(timesteps)
        if self.sigma_schedule is not None:
            high, low = self.sigma_range(sigmas)
            sigmas = respaced_sigmas(self.sigma_schedule, high, low, num_inference_steps)
            timesteps = self.timesteps_at(sigmas)
        self.timesteps: torch.Tensor = timesteps
        """The UNet timestep of each inference step, from the noisiest down."""
        self.sigmas: torch.Tensor = torch.cat([sigmas, sigmas.new_full((1,), self.final_sigma)]).float()
        """The sigma of each inference step, then `final_sigma` (float32), for the solvers that work in sigmas."""

    def _enum(self, key: str, enum: type[StrEnum], value: object) -> Any:
        try:
            return enum(value)
        except ValueError:
            choices = ", ".join(member.value for member in enum)
            raise ValueError(f"{type(self).__name__}: {key} must be one of {choices}, got {value!r}") from None

    def with_settings(self, **settings: Any) -> Self:
        """A new solver of the same class, steps and given settings, with `settings` given too (replacing those
        already given). A subclass whose constructor takes other arguments keeps them in `given_settings`."""
        return type(self)(
            self.num_inference_steps,
            first_inference_step=self.first_inference_step,
            **{**self.given_settings, **settings},
        )

    def with_defaults(self, defaults: Mapping[str, Any]) -> Self:
        """This solver with the settings it was not given taken from `defaults` (a model's `solver_defaults`, the
        constructor's keyword arguments its scheduler config gives), as a new solver of the same class; itself when
        `defaults` changes nothing."""
        missing = {key: value for key, value in defaults.items() if key not in self.given_settings}
        if not missing:
            return self
        solver = self.with_settings(**missing)
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

    @property
    def final_sigma(self) -> float:
        """The sigma a run ends at (after `sigmas` of its steps): 0, clean latents."""
        return 0.0

    def scale_model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The UNet's input at `step` (the latents themselves unless the solver says otherwise)."""
        return x

    @abstractmethod
    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        """The latents after inference step `step`, from the latents `x` and what the UNet predicted (read as
        `prediction_type` says: the noise by default)."""

    @abstractmethod
    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """Noise clean latents `x` to the level the solver expects at the start of inference step `step`."""

    def clean_and_noise(
        self, sample: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean latents and the noise in `sample = alpha * clean + sigma * noise` that `model_output` predicts,
        read as `prediction_type` says."""
        if self.prediction_type == PredictionType.EPSILON:
            return (sample - sigma * model_output) / alpha, model_output
        if self.prediction_type == PredictionType.V_PREDICTION:
            return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
        return model_output, (sample - alpha * model_output) / sigma

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Integer timesteps (int64), as diffusers' DDIM scheduler spaces them."""
        steps, train = self.num_inference_steps, self.num_train_timesteps
        if spacing == TimestepSpacing.LINSPACE:
            return linspace(0, train - 1, steps).round().flip(0).to(torch.int64)
        if spacing == TimestepSpacing.LEADING:
            return (torch.arange(steps, dtype=torch.int64) * (train // steps)).flip(0) + self.steps_offset
        return trailing_timesteps(train, steps)

    @property
    def training_sigmas(self) -> torch.Tensor:
        """`sqrt((1 - alpha_cumprod) / alpha_cumprod)` of each training timestep (float32)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The training sigmas at `timesteps`, linearly interpolated between training timesteps as `numpy.interp`
        does (float64)."""
        sigmas = self.training_sigmas.double()
        points = timesteps.double().clamp(0, len(sigmas) - 1)  # beyond the table, the value at its end
        lower = points.floor().long().clamp(max=len(sigmas) - 2)
        fraction = points - lower
        return (sigmas[lower + 1] - sigmas[lower]) * fraction + sigmas[lower]

    def sigma_range(self, sigmas: torch.Tensor) -> tuple[float, float]:
        """The largest and smallest sigma a `sigma_schedule` spans, from the `sigmas` of the spaced timesteps: theirs
        (as diffusers' Euler and Heun schedulers)."""
        return float(sigmas[0]), float(sigmas[-1])

    def timesteps_at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The (fractional, float32) timesteps of `sigmas`, interpolated in log sigma between training timesteps."""
        return sigma_to_timestep(self.training_sigmas, sigmas).float()

    def __repr__(self) -> str:
        schedule = "" if self.sigma_schedule is None else f", sigma_schedule={str(self.sigma_schedule)!r}"
        return (
            f"{type(self).__name__}(num_inference_steps={self.num_inference_steps}, "
            f"first_inference_step={self.first_inference_step}, timestep_spacing={str(self.timestep_spacing)!r}"
            f"{schedule}, prediction_type={str(self.prediction_type)!r})"
        )


class StochasticSolver(Solver):
    """A solver that adds fresh noise at its steps: one latent-shaped standard normal draw per step that needs one,
    from `generator` (built from `seed` when one is given; torch's global generator when neither is), on the CPU in
    float32 as diffusers' `randn_tensor` draws it with a CPU generator: a reference fed the same generator gets the
    same noise."""

    def __init__(
        self,
        num_inference_steps: int,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **settings: Any,
    ) -> None:
        """`settings` are `Solver`'s. Raises ValueError if both a generator and a seed are given."""
        if generator is not None and seed is not None:
            raise ValueError(f"{type(self).__name__}: give a generator or a seed, not both")
        super().__init__(num_inference_steps, **settings)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        if self.generator is not None:
            self.given_settings["generator"] = self.generator

    def draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        """A standard normal draw of `like`'s shape, on its device and in its dtype."""
        noise = torch.randn(like.shape, generator=self.generator, dtype=torch.float32)
        return noise.to(device=like.device, dtype=like.dtype)


def denoising_end_step(solver: Solver, denoising_end: float) -> int:
    """The step where a base model hands over to a refiner (refiners-sdxl's `refiner_first_step`) when it denoises the
    first `denoising_end` fraction of the schedule, as diffusers' `denoising_end` (base) and `denoising_start`
    (refiner): the first of `solver`'s steps whose timestep is below `round((1 - denoising_end) *
    num_train_timesteps)`.

    The base runs `range(solver.first_inference_step, step)`, the refiner a solver of the same kind and settings
    with `first_inference_step=step`, from the base's latents as they are (no noise added). Raises ValueError
    unless `denoising_end` is strictly between 0 and 1, for a solver that evaluates the model more than once per step
    (Heun), or when the split leaves either model no step.
    """
    check_finite("denoising_end", denoising_end)
    if not 0.0 < denoising_end < 1.0:
        raise ValueError(f"denoising_end must be strictly between 0 and 1, got {denoising_end}")
    if len(solver.timesteps) != solver.num_inference_steps:
        raise ValueError(
            f"denoising_end: {type(solver).__name__} evaluates the model {len(solver.timesteps)} times for "
            f"{solver.num_inference_steps} steps; a base/refiner split needs a solver with one evaluation per step"
        )
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


def respaced_sigmas(schedule: SigmaSchedule, high: float, low: float, num: int) -> torch.Tensor:
    """`num` sigmas from `high` down to `low` (float64): Karras et al.'s ramp with rho = 7, or evenly in log sigma."""
    ramp = linspace(0, 1, num)
    if schedule == SigmaSchedule.KARRAS:
        rho = 7.0
        return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    return linspace(math.log(high), math.log(low), num).exp()


def sigma_to_timestep(training_sigmas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional training timesteps of `sigmas` (float64), interpolated in log sigma between the two training
    timesteps around each, as diffusers' `_sigma_to_t` (the logs of `training_sigmas` kept in their float32)."""
    log_training = training_sigmas.log()
    log_sigmas = sigmas.double().clamp(min=1e-10).log()
    distances = log_sigmas[None, :] - log_training.double()[:, None]
    low = (distances >= 0).long().cumsum(0).argmax(0).clamp(max=len(log_training) - 2)
    low_log, high_log = log_training[low], log_training[low + 1]
    weight = ((low_log.double() - log_sigmas) / (low_log - high_log).double()).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


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
