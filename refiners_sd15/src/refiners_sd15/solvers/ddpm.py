"""`DDPM`: the ancestral sampler of denoising diffusion probabilistic models (Ho et al., arXiv:2006.11239)."""

from __future__ import annotations

import torch

from refiners_sd15.solvers.solver import StochasticSolver


class DDPM(StochasticSolver):
    """DDPM, as diffusers' `DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1)` ("fixed_small" variance, "leading" timesteps): each step samples the
    posterior `q(x_previous | x, x0)` between its timestep and the next one (1 after the last), with one noise draw
    (`StochasticSolver`) at every step whose timestep is above 0."""

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        timestep = int(self.timesteps[step])
        previous = int(self.timesteps[step + 1]) if step + 1 < len(self.timesteps) else -1
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_previous = self.alphas_cumprod[previous] if previous >= 0 else torch.tensor(1.0)
        beta_prod, beta_prod_previous = 1 - alpha_prod, 1 - alpha_prod_previous
        current_alpha = alpha_prod / alpha_prod_previous
        current_beta = 1 - current_alpha
        sample = x.float()
        predicted_x0, _ = self.clean_and_noise(sample, model_output.float(), alpha_prod**0.5, beta_prod**0.5)
        denoised = (alpha_prod_previous**0.5 * current_beta / beta_prod) * predicted_x0 + (
            current_alpha**0.5 * beta_prod_previous / beta_prod
        ) * sample
        if timestep > 0:
            variance = (beta_prod_previous / beta_prod * current_beta).clamp(min=1e-20)
            denoised = denoised + variance**0.5 * self.draw_noise(sample)
        return denoised.to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha_prod = self.alphas_cumprod[int(self.timesteps[step])].to(x.dtype)
        return alpha_prod**0.5 * x + (1 - alpha_prod) ** 0.5 * noise
