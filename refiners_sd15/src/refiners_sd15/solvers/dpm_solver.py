"""`DPMSolver`: DPM-Solver++(2M), the second-order multistep solver of Lu et al. (arXiv:2211.01095)."""

from __future__ import annotations

import torch

from refiners_sd15.solvers.solver import Solver, TimestepSpacing, linspace, trailing_timesteps


class DPMSolver(Solver):
    """DPM-Solver++(2M), as diffusers' `DPMSolverMultistepScheduler` configured for SD1.5.

    `DPMSolver(num_inference_steps=N)` reproduces `DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1)`: "linspace" timesteps over `N + 1` points, data prediction
    ("dpmsolver++"), midpoint second-order updates, a first-order update on the first step of a run and on the last
    step (whose sigma is 0, so it lands on the predicted clean latents).

    The solver remembers the clean latents predicted at the previous step: a second-order update is made when
    `step` follows the step it last saw, so a new run (or an image-to-image run starting later) starts afresh.
    """

    default_spacing = "linspace"
    _previous: tuple[int, torch.Tensor] | None = None  # (step, predicted clean latents) of the last update

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Integer timesteps (int64), as diffusers' DPM-Solver scheduler spaces them (`N + 1` points, last dropped)."""
        steps, train = self.num_inference_steps, self.num_train_timesteps
        if spacing == "linspace":
            points = linspace(0, train - 1, steps + 1).round()
            return points.flip(0)[:-1].to(torch.int64)
        if spacing == "leading":
            points = torch.arange(steps + 1, dtype=torch.int64) * (train // (steps + 1))
            return points.flip(0)[:-1] + self.steps_offset
        return trailing_timesteps(train, steps)

    def step(self, x: torch.Tensor, predicted_noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        predicted_x0 = (x - sigma * predicted_noise) / alpha
        previous = self._previous
        self._previous = (step, predicted_x0)
        last = step == self.num_inference_steps - 1
        if previous is None or previous[0] != step - 1 or last:
            return self._first_order(x.float(), predicted_x0, step).to(x.dtype)
        return self._second_order(x.float(), predicted_x0, previous[1], step).to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(step)
        return alpha.to(x.dtype) * x + sigma.to(x.dtype) * noise

    def _alpha_sigma(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_t = 1 / sqrt(sigma^2 + 1)` and `sigma_t = sigma alpha_t` at `step` (`step = N` is the end: 1, 0)."""
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
        lambda_t, lambda_s0, lambda_s1 = self._lambda(step + 1), self._lambda(step), self._lambda(step - 1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = x0, (1.0 / r0) * (x0 - previous_x0)
        return (
            (sigma_t / sigma_s0) * x
            - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        )
