"""What refiners-sdxl gives `refiners generate` for its `sdxl` model and its `sdxl-refiner` (the `ModelSpec` fields
`detect` and `generate`): `detect_sdxl` and `detect_sdxl_refiner` tell an SDXL base or refiner folder, cached hub id or
single file from what it holds, `generate_sdxl` runs text-to-image or image-to-image on a loaded `StableDiffusion_XL`,
then, with a refiner, `StableDiffusion_XL_Refiner` on the last steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from refiners_core.checks import check_finite_tensor
from refiners_core.model_kinds import find_file, read_json, weight_keys
from refiners_sd15.generation import denoise
from refiners_sd15.solvers import denoising_end_step
from refiners_sdxl.folder import index_has_text_encoder
from refiners_sdxl.model import StableDiffusion_XL
from refiners_sdxl.own_format import BASE_OWN_INDEX, REFINER_OWN_INDEX
from refiners_sdxl.refiner import StableDiffusion_XL_Refiner
from refiners_sdxl.single_file import SDXL_REFINER_TEXT_ENCODER_FORMAT

SDXL_PIPELINE_PREFIX = "StableDiffusionXL"
"""What the `_class_name` of every diffusers SDXL pipeline's `model_index.json` starts with."""
_SINGLE_FILE_TEXT_ENCODERS = "conditioner.embedders."


def detect_sdxl(source: str) -> str | None:
    """What shows that the folder, cached hub id or safetensors file `source` holds an SDXL base model, or None: its
    `refiners_sdxl.json`, `model_index.json`'s `_class_name` with a `text_encoder`, a UNet config with the `text_time`
    added embedding beside a `text_encoder/` config, or a single file's `conditioner.embedders.*` keys. Reads no
    weight and downloads nothing."""
    return _detect(source, refiner=False)


def detect_sdxl_refiner(source: str) -> str | None:
    """What shows that the folder, cached hub id or single file `source` holds an SDXL refiner, or None: its
    `refiners_sdxl_refiner.json`, `model_index.json`'s `_class_name` without a `text_encoder`, a UNet config with
    the `text_time` added embedding and no `text_encoder/` (CLIP-G only), or a single file whose only text encoder is
    `conditioner.embedders.0.model.*`. Reads no weight and downloads nothing."""
    return _detect(source, refiner=True)


def generate_sdxl(
    model: StableDiffusion_XL,
    *,
    prompt: str,
    negative_prompt: str,
    make_solver: Callable[..., Any],
    size: tuple[int, int],
    guidance: float,
    seed: int,
    init_image: Image.Image | None,
    after_step: Callable[[int, torch.Tensor], None],
    refiner: StableDiffusion_XL_Refiner | None = None,
    refiner_fraction: float | None = None,
) -> Image.Image:
    """One image from `model`, as `ModelSpec.generate` says: the solver with the model's scheduler settings,
    micro-conditioning on the generated size, uncropped (as diffusers' `StableDiffusionXLPipeline` and
    `StableDiffusionXLImg2ImgPipeline` by default). With `refiner`, the base runs the first `1 - refiner_fraction` of
    the schedule and the refiner the rest from its latents, and decodes them (diffusers' `denoising_end` and
    `denoising_start`, see `refiner_first_step`). Raises ValueError for latents the autoencoder cannot decode or a
    split that leaves a model no step."""
    model.solver = make_solver()
    handover = None
    if refiner is not None:
        if refiner_fraction is None:
            raise ValueError("generate_sdxl: a refiner needs refiner_fraction, the last part of the steps it runs")
        handover = denoising_end_step(model.solver, 1.0 - refiner_fraction)
    width, height = size
    with torch.no_grad():
        x = model.init_latents(size=(height, width), init_image=init_image, seed=seed)
        conditions = _conditions(model, prompt, negative_prompt, (height, width), guidance)
        x = denoise(model, x, after_step=after_step, until=handover, **conditions)
        if refiner is None:
            return model.lda.latents_to_image(x)
        refiner.solver = make_solver(first_inference_step=handover)
        conditions = _conditions(refiner, prompt, negative_prompt, (height, width), guidance)
        x = denoise(refiner, x, after_step=after_step, **conditions)
        return refiner.lda.latents_to_image(x)


def _conditions(
    model: StableDiffusion_XL | StableDiffusion_XL_Refiner,
    prompt: str,
    negative_prompt: str,
    size: tuple[int, int],
    guidance: float,
) -> dict[str, Any]:
    """The keyword arguments of `model`'s denoising step for an image of `size = (height, width)`."""
    clip_text_embedding, pooled_text_embedding = model.compute_clip_text_embedding(
        prompt, negative_text=negative_prompt
    )
    check_finite_tensor("the text embedding of the prompts", clip_text_embedding)
    if isinstance(model, StableDiffusion_XL):
        time_ids = model.time_ids(original_size=size, target_size=size)
    else:
        time_ids = model.time_ids(original_size=size)
    return {
        "clip_text_embedding": clip_text_embedding,
        "pooled_text_embedding": pooled_text_embedding,
        "time_ids": time_ids,
        "condition_scale": guidance,
    }


def _detect(source: str, *, refiner: bool) -> str | None:
    """`detect_sdxl` (`refiner` False) or `detect_sdxl_refiner`: the two differ by the CLIP-L text encoder, which only
    the base model has."""
    local = Path(source).expanduser()
    if local.is_file():
        text_encoders = [key for key in weight_keys(local) or [] if key.startswith(_SINGLE_FILE_TEXT_ENCODERS)]
        if not text_encoders:
            return None
        refiner_prefix = SDXL_REFINER_TEXT_ENCODER_FORMAT.single_file_prefix
        if all(key.startswith(refiner_prefix) for key in text_encoders) != refiner:
            return None
        if refiner:
            return f"its only text encoder is '{refiner_prefix}*', SDXL's refiner's CLIP-G"
        return f"its keys hold '{_SINGLE_FILE_TEXT_ENCODERS}*', SDXL's text encoders"
    own_index = REFINER_OWN_INDEX if refiner else BASE_OWN_INDEX
    if find_file(source, own_index) is not None:
        return f"it holds {own_index}"
    index = read_json(find_file(source, "model_index.json"))
    if index is not None:
        pipeline = index.get("_class_name")
        is_sdxl = isinstance(pipeline, str) and pipeline.startswith(SDXL_PIPELINE_PREFIX)
        if not is_sdxl or index_has_text_encoder(index) == refiner:
            return None
        return f"model_index.json's _class_name is {pipeline!r}" + (" without text_encoder" if refiner else "")
    unet = read_json(find_file(source, "config.json", subfolder="unet"))
    has_text_encoder = find_file(source, "config.json", subfolder="text_encoder") is not None
    if unet is None or unet.get("addition_embed_type") != "text_time" or has_text_encoder == refiner:
        return None
    if refiner:
        return "unet/config.json has the 'text_time' added embedding and there is no text_encoder/, as SDXL's refiner"
    return "unet/config.json has the 'text_time' added embedding, as SDXL's UNet"
