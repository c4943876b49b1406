"""What refiners-sd15 gives `refiners generate` for its `sd15` model (the `ModelSpec` fields `detect` and `generate`):
`detect_sd15` tells an SD1.5 folder, cached hub id or single file from what it holds, `generate_sd15` runs
text-to-image, image-to-image or inpainting on a loaded `StableDiffusion_1`; `denoise` is the loop every model's
`generate` runs (refiners-sdxl's too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from refiners_core.checks import check_finite_tensor
from refiners_core.model_kinds import find_file, read_json, weight_keys
from refiners_sd15.inpainting import StableDiffusion_1_Inpainting
from refiners_sd15.latent_diffusion import LatentDiffusionModel
from refiners_sd15.model import OWN_INDEX, StableDiffusion_1

SD15_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
"""The diffusers pipelines (`model_index.json`'s `_class_name`) that hold an SD1.5 model."""
_SINGLE_FILE_TEXT_ENCODER = "cond_stage_model."


def detect_sd15(source: str) -> str | None:
    """What shows that the folder, cached hub id or safetensors file `source` holds an SD1.5 model, or None: its
    `refiners_sd15.json`, `model_index.json`'s `_class_name`, a UNet config without SDXL's added embedding, or a single
    file's `cond_stage_model.*` keys. Reads no weight and downloads nothing."""
    local = Path(source).expanduser()
    if local.is_file():
        keys = weight_keys(local) or []
        if any(key.startswith(_SINGLE_FILE_TEXT_ENCODER) for key in keys):
            return f"its keys hold '{_SINGLE_FILE_TEXT_ENCODER}*', SD1.5's text encoder"
        return None
    if find_file(source, OWN_INDEX) is not None:
        return f"it holds {OWN_INDEX}"
    index = read_json(find_file(source, "model_index.json"))
    if index is not None:
        pipeline = index.get("_class_name")
        return f"model_index.json's _class_name is {pipeline!r}" if pipeline in SD15_PIPELINES else None
    unet = read_json(find_file(source, "config.json", subfolder="unet"))
    if unet is not None and "cross_attention_dim" in unet and unet.get("addition_embed_type") is None:
        return "unet/config.json has no added embedding, as SD1.5's UNet"
    return None


def denoise(
    model: LatentDiffusionModel[Any],
    x: torch.Tensor,
    *,
    after_step: Callable[[int, torch.Tensor], None],
    until: int | None = None,
    **conditions: Any,
) -> torch.Tensor:
    """The latents `x` after `model`'s denoising steps: its solver's, up to `until` (excluded) when given (a base
    model handing over to a refiner), each `x = model(x, step=step, **conditions)` followed by `after_step(step, x)`,
    as `ModelSpec.generate` says. `conditions` are the keyword arguments of the model's denoising step (the text
    embeddings, `condition_scale`...)."""
    for step in model.steps:
        if until is not None and step >= until:
            break
        x = model(x, step=step, **conditions)
        after_step(step, x)
    return x


def generate_sd15(
    model: StableDiffusion_1,
    *,
    prompt: str,
    negative_prompt: str,
    make_solver: Callable[..., Any],
    size: tuple[int, int],
    guidance: float,
    seed: int,
    init_image: Image.Image | None,
    after_step: Callable[[int, torch.Tensor], None],
    mask: Image.Image | None = None,
) -> Image.Image:
    """One image from `model`, as `ModelSpec.generate` says; with `mask` (white: what to repaint) and an
    `init_image`, a `StableDiffusion_1_Inpainting` inpaints. Raises ValueError for a mask without an inpainting model
    or init image, or latents the autoencoder cannot decode."""
    model.solver = make_solver()
    width, height = size
    with torch.no_grad():
        embedding = model.compute_clip_text_embedding(prompt, negative_text=negative_prompt)
        check_finite_tensor("the text embedding of the prompts", embedding)
        if mask is not None:
            if not isinstance(model, StableDiffusion_1_Inpainting) or init_image is None:
                raise ValueError("a mask needs an inpainting model and an init image")
            model.set_inpainting_conditions(init_image.resize((width, height), Image.Resampling.LANCZOS), mask)
        # as diffusers: image-to-image noises the image's latents; inpainting from scratch starts from noise
        start_image = init_image if mask is None or model.solver.first_inference_step > 0 else None
        x = model.init_latents(size=(height, width), init_image=start_image, seed=seed)
        x = denoise(model, x, after_step=after_step, clip_text_embedding=embedding, condition_scale=guidance)
        return model.lda.latents_to_image(x)
