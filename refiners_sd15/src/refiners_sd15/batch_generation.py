"""`generate_batch_sd15`, the `ModelSpec.generate_batch` of the `sd15` model: several images in one denoising run,
each from the noise of its own seed (`refiners generate --batch-size`); and `batch_latents`, the starting latents of
such a batch, shared with refiners-sdxl."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from refiners_core.checks import check_finite_tensor
from refiners_sd15.generation import denoise
from refiners_sd15.latent_diffusion import LatentDiffusionModel
from refiners_sd15.model import StableDiffusion_1


def batch_latents(
    model: LatentDiffusionModel[Any],
    size: tuple[int, int],
    seeds: Sequence[int],
    init_images: Sequence[Image.Image | None],
) -> torch.Tensor:
    """The starting latents of a batch, `(len(seeds), C, height / 8, width / 8)` for `size = (height, width)`: row i is
    `model.init_latents(size, init_images[i], seed=seeds[i])`, what image i alone would start from. Raises ValueError
    if the counts differ (and what `init_latents` raises)."""
    if len(seeds) != len(init_images):
        raise ValueError(f"a batch needs one init image (or None) per seed: got {len(seeds)} seeds, {len(init_images)}")
    return torch.cat(
        [model.init_latents(size=size, init_image=image, seed=seed) for seed, image in zip(seeds, init_images)]
    )


def generate_batch_sd15(
    model: StableDiffusion_1,
    *,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    seeds: Sequence[int],
    init_images: Sequence[Image.Image | None],
    make_solver: Callable[..., Any],
    size: tuple[int, int],
    guidance: float,
    after_step: Callable[[int, torch.Tensor], None],
) -> list[Image.Image]:
    """Several images from `model`, as `ModelSpec.generate_batch` says. Raises ValueError for counts that differ or
    latents the autoencoder cannot decode."""
    model.solver = make_solver()
    width, height = size
    with torch.no_grad():
        embedding = model.compute_clip_text_embedding(list(prompts), negative_text=list(negative_prompts))
        check_finite_tensor("the text embedding of the prompts", embedding)
        x = batch_latents(model, (height, width), seeds, init_images)
        x = denoise(model, x, after_step=after_step, clip_text_embedding=embedding, condition_scale=guidance)
        return model.lda.latents_to_images(x)
