"""The training objective of Stable Diffusion 1.5 and SDXL: DDPM noise prediction.

A sample's latents `x0` are noised to a random timestep `t` as `sqrt(a_t) x0 + sqrt(1 - a_t) noise`, with `a_t` the
cumulative product of `1 - beta` over the "scaled linear" schedule SD1.5 and SDXL were trained with (betas from
0.00085 to 0.012, square-root spaced, 1000 steps, in float32 as diffusers' DDPMScheduler); the UNet predicts `noise`
(epsilon) and the loss is their mean squared error.
"""

from __future__ import annotations

import hashlib

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


class NoiseSchedule:
    """The DDPM forward process of SD1.5 and SDXL: `add_noise(latents, noise, timesteps)` at integer `timesteps`
    `(B,)`."""

    def __init__(
        self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`sqrt(a_t) * latents + sqrt(1 - a_t) * noise`, one `t` per sample, in the dtype of `latents`."""
        alphas = self.alphas_cumprod[timesteps.cpu()].to(device=latents.device, dtype=torch.float32)
        alphas = alphas.reshape(-1, *([1] * (latents.ndim - 1)))
        return (alphas.sqrt() * latents.float() + (1 - alphas).sqrt() * noise.float()).to(latents.dtype)


def sample_generator(seed: int, position: int, purpose: str = "noise") -> torch.Generator:
    """A CPU generator for the sample at `position` of the run's data order, drawn from `(seed, position)` alone,
    one stream per `purpose` (`"noise"`: its noise and timestep; `"crop"`: where a random crop falls).

    What it draws is the same whichever process handles the sample and whether the run was resumed or not.
    """
    digest = hashlib.sha256(f"refiners-training-{purpose}:{seed}:{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_noise(
    seed: int, positions: list[int], shape: tuple[int, ...], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise `(len(positions), *shape)` (float32, CPU) and timesteps `(len(positions),)` for these data positions."""
    noises: list[torch.Tensor] = []
    timesteps: list[int] = []
    for position in positions:
        generator = sample_generator(seed, position)
        timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=generator).item()))
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises), torch.tensor(timesteps, dtype=torch.long)
