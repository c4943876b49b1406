"""`Heun`: Heun's second-order method on the probability flow ODE (Karras et al., arXiv:2206.00364, Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch

from refiners_sd15.solvers.euler import Euler


class Heun(Euler):
    """Heun's method, as diffusers' `HeunDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1)`: each of the `N` steps but the last evaluates the model twice,
    an Euler step then its correction with the average of both slopes; the last (to sigma 0) is an Euler step.

    As in diffusers, `timesteps` (and `sigmas`) list every evaluation, the timesteps of steps 1 to `N - 1` twice
    (`2N - 1` in all), and `inference_steps` indexes them: loops over `inference_steps` (`model.steps`) run
    unchanged, even indices being Euler steps and odd ones corrections. `first_inference_step` and `add_noise` still
    count steps (image-to-image from step `k` starts at evaluation `2k`, as diffusers' pipelines).
    """

    _euler_step: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (evaluation, slope, latents) to correct

    def __init__(self, num_inference_steps: int, **settings: Any) -> None:
        """`settings` are `Solver`'s."""
        super().__init__(num_inference_steps, **settings)
        self.timesteps = torch.cat([self.timesteps[:1], self.timesteps[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([self.sigmas[:1], self.sigmas[1:-1].repeat_interleave(2), self.sigmas[-1:]])

    @property
    def inference_steps(self) -> range:
        """The model evaluations of a denoising run: `2 * first_inference_step` to `2 * num_inference_steps - 2`."""
        return range(2 * self.first_inference_step, len(self.timesteps))

    def step(self, x: torch.Tensor, model_output: torch.Tensor, step: int) -> torch.Tensor:
        """The latents after evaluation `step`: an Euler step for an even one, its correction for an odd one.
        Raises ValueError for a correction that does not follow its Euler step."""
        sample = x.float()
        if step % 2 == 0:
            sigma, sigma_next = self.sigmas[step], self.sigmas[step + 1]
            slope = (sample - self.clean_latents(sample, model_output, sigma)) / sigma
            self._euler_step = (step, slope, sample)
            return (sample + slope * (sigma_next - sigma)).to(x.dtype)
        euler_step, self._euler_step = self._euler_step, None
        if euler_step is None or euler_step[0] != step - 1:
            raise ValueError(f"Heun: evaluation {step} corrects evaluation {step - 1}, which was not the last one run")
        _, first_slope, start = euler_step
        sigma, sigma_next = self.sigmas[step - 1], self.sigmas[step]
        slope = (sample - self.clean_latents(sample, model_output, sigma_next)) / sigma_next
        return (start + (first_slope + slope) / 2 * (sigma_next - sigma)).to(x.dtype)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """`x` noised to the sigma of step `step` (evaluation `2 * step`)."""
        return x + noise * self.sigmas[2 * step].to(x.dtype)
