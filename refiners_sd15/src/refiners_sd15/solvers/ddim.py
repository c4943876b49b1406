"""`DDIM`: the deterministic denoising diffusion implicit models solver (arXiv:2010.02502), eta = 0."""

from __future__ import annotations

import torch

from refiners_sd15.solvers.solver import Solver, TimestepSpacing


class DDIM(Solver):
    """DDIM with eta = 0, as diffusers' `DDIMScheduler` configured for SD1.5.

    `DDIM(num_inference_steps=N)` reproduces `DDIMScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)` with "leading"
    timesteps. As there, the step after timestep `t` is `t - num_train_timesteps // num_inference_steps` whatever
    the spacing, and the last step goes to `alphas_cumprod[0]`.
    """

    default_spacing = TimestepSpacing.LEADING

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        timestep = int(self.timesteps[step])
        previous = timestep - self.num_train_timesteps // self.num_inference_steps
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_previous = self.alphas_cumprod[previous] if previous >= 0 else self.alphas_cumprod[0]
        sample = x.float()
        predicted_x0, noise = self.clean_and_noise(
            sample, model_output.float(), alpha_prod**0.5, (1 - alpha_prod) ** 0.5
        )
        denoised = alpha_prod_previous**0.5 * predicted_x0 + (1 - alpha_prod_previous) ** 0.5 * noise
        return denoised.to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha_prod = self.alphas_cumprod[int(self.timesteps[step])].to(x.dtype)
        return alpha_prod**0.5 * x + (1 - alpha_prod) ** 0.5 * noise
