"""`EulerAncestral`: Euler steps with fresh noise added back at each step (k-diffusion's `sample_euler_ancestral`)."""

from __future__ import annotations

import torch

from refiners_sd15.solvers.euler import Euler
from refiners_sd15.solvers.solver import StochasticSolver


class EulerAncestral(Euler, StochasticSolver):
    """Euler ancestral, as diffusers' `EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1)` (A1111's "Euler a", ComfyUI's "euler_ancestral"): the timesteps,
    sigmas and input scaling of `Euler`; each step goes down to `sigma_down` and adds `sigma_up` times one fresh
    noise draw (`StochasticSolver`), with `sigma_down^2 + sigma_up^2` the next sigma squared."""

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[step], self.sigmas[step + 1]
        sample = x.float()
        predicted_x0 = self.clean_latents(sample, model_output, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - predicted_x0) / sigma
        denoised = sample + derivative * (sigma_down - sigma) + self.draw_noise(sample) * sigma_up
        return denoised.to(x.dtype)
