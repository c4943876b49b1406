"""`LatentDiffusionModel`: what the Stable Diffusion models share, a solver driving a UNet in the latent space of an
autoencoder (SD1.5's `StableDiffusion_1`, refiners-sdxl's `StableDiffusion_XL`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

import refiners_core.fluxion as fl
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.solvers import DPMSolver, Solver

TUNet = TypeVar("TUNet", bound=fl.Module)


class LatentDiffusionModel(fl.Module, Generic[TUNet]):
    """A UNet `unet` denoising latents of the autoencoder `lda`, step by step with `solver`.

    It gives the denoising loop's two shared pieces: `steps` (the solver's steps, with a progress bar) and
    `init_latents` (the starting latents of text-to-image or image-to-image). Subclasses add the text encoders and
    the denoising step `forward(x, step, ...)`: `solver.scale_model_input`, the UNet with classifier-free guidance,
    then `solver.step`. `solver` defaults to `DPMSolver(num_inference_steps=30)`.
    """

    def __init__(
        self, unet: TUNet, lda: SD1Autoencoder, *, solver: Solver | None = None, show_progress: bool = True
    ) -> None:
        super().__init__()
        self.solver: Solver = solver if solver is not None else DPMSolver(num_inference_steps=30)
        self.show_progress = show_progress
        self.unet: TUNet = unet
        self.lda = lda

    @property
    def steps(self) -> Iterable[int]:
        """The solver's inference steps, with a tqdm progress bar unless `show_progress` is False."""
        return tqdm(self.solver.inference_steps, desc="denoising", unit="step", disable=not self.show_progress)

    def init_latents(
        self,
        size: tuple[int, int],
        init_image: Image.Image | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The latents a denoising run starts from, for an image of `size = (height, width)` pixels.

        `noise` (shape `(1, latent_channels, height / 8, width / 8)`) is drawn when not given, from `generator` or
        `seed`, on the CPU in the model's dtype as diffusers does: a seed gives the same noise on every device.
        Without `init_image`, the noise is scaled by the solver's `init_noise_sigma`; with one (resized to `size`),
        its latents are noised to the level of the solver's `first_inference_step` (image-to-image). Raises
        ValueError for a size that is not a multiple of 8, a noise of the wrong shape, both a generator and a seed,
        or a solver that starts later than its first step without an `init_image`.
        """
        height, width = size
        factor = self.lda.downscale_factor
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ValueError(f"size (height, width) must be positive multiples of {factor}, got {size}")
        shape = (1, self.lda.config.latent_channels, height // factor, width // factor)
        if noise is None:
            if generator is not None and seed is not None:
                raise ValueError("give init_latents a generator or a seed, not both")
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(shape, generator=generator, dtype=self.unet.dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for size {size}, got {tuple(noise.shape)}")
        noise = noise.to(device=self.unet.device, dtype=self.unet.dtype)
        if init_image is None:
            if self.solver.first_inference_step > 0:
                raise ValueError(
                    f"the solver starts at step {self.solver.first_inference_step}: image-to-image needs an init_image"
                )
            return noise * self.solver.init_noise_sigma
        if init_image.size != (width, height):
            init_image = init_image.resize((width, height), Image.Resampling.LANCZOS)
        latents = self.lda.image_to_latents(init_image).to(dtype=noise.dtype)
        return self.solver.add_noise(latents, noise, self.solver.first_inference_step)
