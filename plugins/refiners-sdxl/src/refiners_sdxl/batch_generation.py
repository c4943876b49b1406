"""`generate_batch_sdxl`, the `ModelSpec.generate_batch` of the `sdxl` model: several images in one denoising run,
each from the noise of its own seed (`refiners generate --batch-size`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from refiners_core.checks import check_finite_tensor
from refiners_sd15.batch_generation import batch_latents
from refiners_sd15.generation import denoise
from refiners_sdxl.model import StableDiffusion_XL


def generate_batch_sdxl(
    model: StableDiffusion_XL,
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
    """Several images from `model`, as `ModelSpec.generate_batch` says, conditioned as `generate_sdxl` conditions one
    (micro-conditioning on the generated size, uncropped). Raises ValueError for counts that differ or latents the
    autoencoder cannot decode."""
    model.solver = make_solver()
    width, height = size
    with torch.no_grad():
        x = batch_latents(model, (height, width), seeds, init_images)
        embedding, pooled = model.compute_clip_text_embedding(list(prompts), negative_text=list(negative_prompts))
        check_finite_tensor("the text embedding of the prompts", embedding)
        time_ids = model.time_ids(original_size=(height, width), target_size=(height, width))
        x = denoise(
            model,
            x,
            after_step=after_step,
            clip_text_embedding=embedding,
            pooled_text_embedding=pooled,
            time_ids=time_ids.repeat_interleave(len(seeds), dim=0),
            condition_scale=guidance,
        )
        return model.lda.latents_to_images(x)
