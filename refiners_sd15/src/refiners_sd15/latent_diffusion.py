"""`LatentDiffusionModel`: what the Stable Diffusion models share, a solver driving a UNet in the latent space of an
autoencoder (SD1.5's `StableDiffusion_1`, refiners-sdxl's `StableDiffusion_XL`)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite, check_finite_tensor
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.solvers import DPMSolver, Solver

TUNet = TypeVar("TUNet", bound=fl.Module)

MAX_IMAGE_SIDE = 8192
"""The largest width or height, in pixels, of a generated image, an init image or a mask."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest width times height of a generated image (16.8 megapixels: 4096x4096, or 8192x2048)."""


def check_image_size(width: int, height: int, what: str = "image size") -> None:
    """Raise ValueError, naming `what` and the size, unless `width`x`height` is a size SD1.5 can generate: positive
    multiples of 8, each side at most `MAX_IMAGE_SIDE` and the area at most `MAX_IMAGE_PIXELS`.

    Checked before anything is allocated: a 100000x100000 request is refused at once rather than dying in the
    allocator.
    """
    try:
        width, height = operator.index(width), operator.index(height)
    except TypeError:
        raise ValueError(f"{what} must be integers, got {width!r}x{height!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"{what} {width}x{height} (width x height): each side must be a positive multiple of 8")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} {width}x{height} (width x height): each side must be at most {MAX_IMAGE_SIDE}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} {width}x{height} (width x height) has {width * height} pixels, more than the {MAX_IMAGE_PIXELS} "
            "(4096x4096) allowed"
        )


def check_input_image(image: object, what: str = "image") -> None:
    """Raise TypeError unless `image` is a PIL image, ValueError naming `what` unless each of its sides is from 1 to
    `MAX_IMAGE_SIDE` pixels (init images and masks are resized to the generated size: this bounds what is read)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ValueError(
            f"{what} is {width}x{height} (width x height): each side must be from 1 to {MAX_IMAGE_SIDE} pixels"
        )


def guidance_prompts(text: object, negative_text: object = "") -> list[str]:
    """The prompts of a classifier-free guidance batch, the negative ones first: `text` (a string, or a list or tuple
    of strings) and `negative_text` (one string for every prompt, or one per prompt), as `compute_clip_text_embedding`
    encodes them. Raises TypeError if a prompt is not a string, ValueError if there is no prompt or the counts of
    prompts and negative prompts differ."""
    texts = _prompts("prompt", text, 1)
    negatives = _prompts("negative prompt", negative_text, len(texts))
    if not texts:
        raise ValueError("compute_clip_text_embedding needs at least one prompt")
    if len(negatives) != len(texts):
        raise ValueError(f"got {len(texts)} prompts but {len(negatives)} negative prompts")
    return [*negatives, *texts]


def _prompts(what: str, value: object, copies: int) -> list[str]:
    """`value`, a string (repeated `copies` times) or a list or tuple of strings, as a list; TypeError otherwise."""
    prompts: list[object] = [value] * copies if isinstance(value, str) else []
    if isinstance(value, list | tuple):
        prompts = list(value)  # pyright: ignore[reportUnknownArgumentType]
    elif not isinstance(value, str):
        prompts = [value]
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"a {what} must be a string, got {type(prompt).__name__} {prompt!r:.50}")
    return [str(prompt) for prompt in prompts]


MAX_SEED = 2**64 - 1
"""The largest seed (torch's generators take 64-bit seeds)."""


class LatentDiffusionModel(fl.Module, Generic[TUNet]):
    """A UNet `unet` denoising latents of the autoencoder `lda`, step by step with `solver`.

    It gives the denoising loop's two shared pieces: `steps` (the solver's steps, with a progress bar) and
    `init_latents` (the starting latents of text-to-image or image-to-image). Subclasses add the text encoders and
    the denoising step `forward(x, step, ...)`: `solver.scale_model_input`, the UNet with classifier-free guidance,
    then `solver.step`. `solver` defaults to `DPMSolver(num_inference_steps=30)`.

    `solver_defaults` are the solver settings of the model's scheduler config (keyword arguments of every `Solver`;
    none for SD1.5, whose schedule is the solvers' own): a solver set on the model takes those it was not given
    (`Solver.with_defaults`), so `sdxl.solver = DPMSolver(num_inference_steps=30)` has SDXL's "leading" spacing while
    `DPMSolver(num_inference_steps=30, timestep_spacing="linspace")` keeps its own.
    """

    def __init__(
        self,
        unet: TUNet,
        lda: SD1Autoencoder,
        *,
        solver: Solver | None = None,
        solver_defaults: Mapping[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        self.solver_defaults: dict[str, Any] = dict(solver_defaults or {})
        """Keyword arguments of every refiners-sd15 solver that reproduce the model's scheduler config."""
        self.solver = solver if solver is not None else DPMSolver(num_inference_steps=30)
        self.show_progress = show_progress
        self.unet: TUNet = unet
        self.lda = lda

    @property
    def solver(self) -> Solver:
        """The solver of the denoising loop; one set here takes the model's `solver_defaults` for the settings it was
        not given (it is then a new solver, `Solver.with_defaults`)."""
        return self._solver

    @solver.setter
    def solver(self, solver: Solver) -> None:
        self._solver = solver.with_defaults(self.solver_defaults)

    def guided_noise(self, x: torch.Tensor, condition_scale: float) -> torch.Tensor:
        """The UNet's noise prediction for the (already scaled) latents `x`, its conditions already set for the batch
        `[x, x]` (negative first), combined by classifier-free guidance: `negative + condition_scale * (positive -
        negative)`. Raises ValueError if `condition_scale` is NaN or infinite (it would turn every latent into NaN)."""
        check_finite("condition_scale", condition_scale)
        negative, positive = self.unet(self.unet_input(torch.cat([x, x]))).chunk(2)
        return negative + condition_scale * (positive - negative)

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the UNet gets for `latents` (themselves; an inpainting model adds its conditions)."""
        return latents

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
        its latents are noised to the level of the solver's `first_inference_step` (image-to-image); its pixels are
        read by meaning (`refiners_core.images.to_rgb`: 16-bit and float images are scaled, not clipped). Raises
        ValueError, before allocating anything, for a size `check_image_size` refuses (multiples of 8, each side at
        most `MAX_IMAGE_SIDE`, at most `MAX_IMAGE_PIXELS`), an `init_image` with a side over `MAX_IMAGE_SIDE`, a
        noise of the wrong shape or with NaN or infinite values, a seed outside 0 to `MAX_SEED`, both a generator and
        a seed, or a solver that starts later than its first step without an `init_image`.
        """
        try:
            height, width = size
        except (TypeError, ValueError):
            raise ValueError(f"init_latents size must be (height, width), got {size!r}") from None
        check_image_size(width, height, "init_latents size")
        if init_image is not None:
            check_input_image(init_image, "init_latents init_image")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"init_latents seed must be an integer from 0 to 2**64-1, got {seed!r}")
        factor = self.lda.downscale_factor
        if height % factor or width % factor:
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
        else:
            check_finite_tensor("noise", noise)
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
