"""`DPMSolver`: DPM-Solver++(2M), the second-order multistep solver of Lu et al. (arXiv:2211.01095), and
`DPMSolverSDE`, its stochastic variant (DPM-Solver++ 2M SDE)."""

from __future__ import annotations

from typing import Any

import torch

from refiners_sd15.solvers.solver import (
    SigmaSchedule,
    Solver,
    StochasticSolver,
    TimestepSpacing,
    linspace,
    sigma_to_timestep,
    trailing_timesteps,
)


class DPMSolver(Solver):
    """DPM-Solver++(2M), as diffusers' `DPMSolverMultistepScheduler` configured for SD1.5.

    `DPMSolver(num_inference_steps=N)` reproduces `DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1)`: "linspace" timesteps over `N + 1` points, data prediction
    ("dpmsolver++"), midpoint second-order updates, a first-order update on the first step of a run and on the last
    step (whose sigma is 0, so it lands on the predicted clean latents). With `final_step_first_order=False` the run
    ends at the smallest training sigma and its last step is second-order too (diffusers' `final_sigmas_type=
    "sigma_min"`, `lower_order_final=False`). `sigma_schedule` is diffusers' `use_karras_sigmas` /
    `use_exponential_sigmas` (over the whole training range, timesteps rounded).

    The solver remembers the clean latents predicted at the previous step: a second-order update is made when
    `step` follows the step it last saw, so a new run (or an image-to-image run starting later) starts afresh.
    It draws no noise (`DPMSolverSDE` does).
    """

    default_spacing = TimestepSpacing.LINSPACE
    uses_sigmas = True
    _previous: tuple[int, torch.Tensor] | None = None  # (step, predicted clean latents) of the last update

    def __init__(self, num_inference_steps: int, *, final_step_first_order: bool | None = None, **settings: Any):
        """`settings` are `Solver`'s (and `StochasticSolver`'s for `DPMSolverSDE`); `final_step_first_order`
        defaults to True."""
        self.final_step_first_order = True if final_step_first_order is None else final_step_first_order
        super().__init__(num_inference_steps, **settings)
        if final_step_first_order is not None:
            self.given_settings["final_step_first_order"] = final_step_first_order

    @property
    def final_sigma(self) -> float:
        """0, or the smallest training sigma without `final_step_first_order`."""
        return 0.0 if self.final_step_first_order else float(self.training_sigmas[0])

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Integer timesteps (int64), as diffusers' DPM-Solver scheduler spaces them (`N + 1` points, last dropped)."""
        steps, train = self.num_inference_steps, self.num_train_timesteps
        if spacing == TimestepSpacing.LINSPACE:
            points = linspace(0, train - 1, steps + 1).round()
            return points.flip(0)[:-1].to(torch.int64)
        if spacing == TimestepSpacing.LEADING:
            points = torch.arange(steps + 1, dtype=torch.int64) * (train // (steps + 1))
            return points.flip(0)[:-1] + self.steps_offset
        return trailing_timesteps(train, steps)

    def sigma_range(self, sigmas: torch.Tensor) -> tuple[float, float]:
        """The whole training range, as diffusers' DPM-Solver scheduler."""
        return float(self.training_sigmas[-1]), float(self.training_sigmas[0])

    def timesteps_at(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Integer timesteps (int64): rounded for Karras sigmas, truncated for exponential ones, as diffusers."""
        timesteps = sigma_to_timestep(self.training_sigmas, sigmas)
        return (timesteps.round() if self.sigma_schedule == SigmaSchedule.KARRAS else timesteps).to(torch.int64)

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        sample = x.float()
        predicted_x0, _ = self.clean_and_noise(sample, model_output.float(), alpha, sigma)
        previous = self._previous
        self._previous = (step, predicted_x0)
        last = step == self.num_inference_steps - 1 and self.final_step_first_order
        if previous is None or previous[0] != step - 1 or last:
            return self._first_order(sample, predicted_x0, step).to(x.dtype)
        return self._second_order(sample, predicted_x0, previous[1], step).to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        return alpha.to(x.dtype) * x + sigma.to(x.dtype) * noise

    def _alpha_sigma(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_t = 1 / sqrt(sigma^2 + 1)` and `sigma_t = sigma alpha_t` at `step` (`step = N` is the end)."""
        alpha = 1 / ((self.sigmas[step] ** 2 + 1) ** 0.5)
        return alpha, self.sigmas[step] * alpha

    def _lambda(self, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        return torch.log(alpha) - torch.log(sigma)

    def _first_order(self, x: torch.Tensor, x0: torch.Tensor, step: int) -> torch.Tensor:
        alpha_t, sigma_t = self._alpha_sigma(step + 1)
        _, sigma_s = self._alpha_sigma(step)
        h = self._lambda(step + 1) - self._lambda(step)
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _second_order(self, x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor, step: int) -> torch.Tensor:
        alpha_t, sigma_t = self._alpha_sigma(step + 1)
        _, sigma_s0 = self._alpha_sigma(step)
        h, r0 = self._h_r0(step)
        d0, d1 = x0, (1.0 / r0) * (x0 - previous_x0)
        return (
            (sigma_t / sigma_s0) * x
            - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        )

    def _h_r0(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step in log-SNR `h` and the ratio `r0` of the previous step's to it."""
        lambda_t, lambda_s0, lambda_s1 = self._lambda(step + 1), self._lambda(step), self._lambda(step - 1)
        h = lambda_t - lambda_s0
        return h, (lambda_s0 - lambda_s1) / h


class DPMSolverSDE(DPMSolver, StochasticSolver):
    """DPM-Solver++ 2M SDE, as diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")` (with
    `sigma_schedule="karras"`: A1111's "DPM++ 2M SDE Karras", ComfyUI's "dpmpp_2m_sde" + "karras"). It draws one
    noise per step (`StochasticSolver`), the last step's included, as diffusers does."""

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        sample = x.float()
        predicted_x0, _ = self.clean_and_noise(sample, model_output.float(), alpha, sigma)
        noise = self.draw_noise(sample)
        previous = self._previous
        self._previous = (step, predicted_x0)
        alpha_t, sigma_t = self._alpha_sigma(step + 1)
        last = step == self.num_inference_steps - 1 and self.final_step_first_order
        if previous is None or previous[0] != step - 1 or last:
            h = self._lambda(step + 1) - self._lambda(step)
            data = predicted_x0
        else:
            h, r0 = self._h_r0(step)
            data = predicted_x0 + 0.5 * (1.0 / r0) * (predicted_x0 - previous[1])
        decay = torch.exp(-h)
        denoised = (
            (sigma_t / sigma * decay) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * data
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise
        )
        return denoised.to(x.dtype)
