"""`LCM`: the multistep sampler of latent consistency models (Luo et al., arXiv:2310.04378), for LCM-LoRA."""

from __future__ import annotations

from typing import Any

import torch

from refiners_sd15.solvers.solver import StochasticSolver, TimestepSpacing


class LCM(StochasticSolver):
    """Latent consistency sampling, as diffusers' `LCMScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear")` as LCM-LoRA ships it: `N` timesteps picked evenly from the `original_steps`
    (50) of distillation, `k * T / original_steps - 1`; each step predicts the clean latents through the consistency
    boundary condition (`c_skip`, `c_out`, `timestep_scaling` 10) and noises them again to the next timestep with one
    noise draw (`StochasticSolver`), the last step returning them as they are. Its timesteps ignore
    `timestep_spacing`. Use it with an LCM model or LCM-LoRA and a low guidance (1 to 2), in 2 to 8 steps.
    Image-to-image (`first_inference_step > 0`) starts at that step of these timesteps, where diffusers' LCM
    img2img pipeline picks its steps again within the strength's part of the distillation timesteps.
    """

    def __init__(
        self,
        num_inference_steps: int,
        *,
        original_steps: int | None = None,
        timestep_scaling: float | None = None,
        **settings: Any,
    ) -> None:
        """`settings` are `StochasticSolver`'s and `Solver`'s. Raises ValueError, naming the setting, unless
        `num_inference_steps <= original_steps <= num_train_timesteps`."""
        self.original_steps = 50 if original_steps is None else original_steps
        self.timestep_scaling = 10.0 if timestep_scaling is None else timestep_scaling
        super().__init__(num_inference_steps, **settings)
        for key, value in (("original_steps", original_steps), ("timestep_scaling", timestep_scaling)):
            if value is not None:
                self.given_settings[key] = value

    def timesteps_for(self, spacing: TimestepSpacing) -> torch.Tensor:
        """Integer timesteps (int64), as diffusers' LCM scheduler picks them, whatever the spacing."""
        steps, train, original = self.num_inference_steps, self.num_train_timesteps, self.original_steps
        if not steps <= original <= train:
            raise ValueError(
                f"LCM: original_steps must be from num_inference_steps ({steps}) to num_train_timesteps ({train}), "
                f"got {original}"
            )
        origin = (torch.arange(1, original + 1, dtype=torch.int64) * (train // original) - 1).flip(0)
        indices = (torch.arange(steps, dtype=torch.float64) * (original / steps)).floor().to(torch.int64)
        return origin[indices]

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        timestep = int(self.timesteps[step])
        last = step == len(self.timesteps) - 1
        alpha_prod = self.alphas_cumprod[timestep]
        sample = x.float()
        predicted_x0, _ = self.clean_and_noise(sample, model_output.float(), alpha_prod**0.5, (1 - alpha_prod) ** 0.5)
        scaled = timestep * self.timestep_scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5  # sigma_data = 0.5
        denoised = c_out * predicted_x0 + c_skip * sample
        if last:
            return denoised.to(x.dtype)
        alpha_prod_next = self.alphas_cumprod[int(self.timesteps[step + 1])]
        noise = self.draw_noise(sample)
        return (alpha_prod_next**0.5 * denoised + (1 - alpha_prod_next) ** 0.5 * noise).to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        alpha_prod = self.alphas_cumprod[int(self.timesteps[step])].to(x.dtype)
        return alpha_prod**0.5 * x + (1 - alpha_prod) ** 0.5 * noise
