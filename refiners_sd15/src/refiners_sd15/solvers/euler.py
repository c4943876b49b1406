"""`Euler`: Euler's method on the probability flow ODE in sigma (Karras et al., arXiv:2206.00364, Algorithm 2)."""

from __future__ import annotations

import torch

from refiners_sd15.solvers.solver import Solver, TimestepSpacing, linspace, trailing_timesteps


class Euler(Solver):
    """The deterministic Euler solver, as diffusers' `EulerDiscreteScheduler` configured for SD1.5.

    `Euler(num_inference_steps=N)` reproduces `EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1)`: "linspace" timesteps (not rounded: the UNet gets fractional
    timesteps), sigmas interpolated between training timesteps, starting noise scaled by the largest sigma
    (`sqrt(sigma^2 + 1)` with "leading" spacing) and UNet inputs scaled by `1 / sqrt(sigma^2 + 1)`.
    """

    default_spacing = TimestepSpacing.LINSPACE
    uses_sigmas = True

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Float32 timesteps, as diffusers' Euler scheduler spaces them."""
        steps, train = self.num_inference_steps, self.num_train_timesteps
        if spacing == "linspace":
            return linspace(0, train - 1, steps).flip(0).float()
        if spacing == "leading":
            return (torch.arange(steps, dtype=torch.float64) * (train // steps)).flip(0).float() + self.steps_offset
        return trailing_timesteps(train, steps).float()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        largest = self.sigmas.max()
        return largest if self.timestep_spacing in ("linspace", "trailing") else (largest**2 + 1) ** 0.5

    def scale_model_input(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return x / ((self.sigmas[step] ** 2 + 1) ** 0.5)

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        sigma = self.sigmas[step]
        sample = x.float()
        predicted_x0 = self.clean_latents(sample, model_output, sigma)
        derivative = (sample - predicted_x0) / sigma
        denoised = sample + derivative * (self.sigmas[step + 1] - sigma)
        return denoised.to(x.dtype)

    def clean_latents(self, x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The clean latents `model_output` predicts for the latents `x` at `sigma` (`x = clean + sigma * noise`)."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        clean, _ = self.clean_and_noise(x * alpha, model_output.float(), alpha, sigma * alpha)
        return clean

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        return x + noise * self.sigmas[step].to(x.dtype)
