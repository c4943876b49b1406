"""SDXL's original single-file checkpoints, each config read from the tensors' shapes:

- the base model (`sd_xl_base_1.0.safetensors`, and the inpainting model's, whose UNet takes 9 channels):
  `model.diffusion_model.*` (UNet), `conditioner.embedders.0.transformer.*` (CLIP-L, transformers names),
  `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, OpenCLIP names) and `first_stage_model.*` (autoencoder);
- the refiner (`sd_xl_refiner_1.0.safetensors`): the same, with OpenCLIP ViT-bigG, its only text encoder, as
  `conditioner.embedders.0.model.*`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from refiners_sd15.autoencoder import (
    AUTOENCODER_FORMAT,
    AutoencoderConfig,
    SD1Autoencoder,
    autoencoder_config_from_ldm,
)
from refiners_sd15.clip import (
    SDXL_TEXT_ENCODER_2_FORMAT,
    SDXL_TEXT_ENCODER_FORMAT,
    CLIPTextEncoderG,
    CLIPTextEncoderL,
    DoubleTextEncoder,
)
from refiners_sd15.loading import load_single_file_component, read_single_file_config
from refiners_sdxl.config import SDXL_AUTOENCODER
from refiners_sdxl.folder import (
    SCHEDULER_DEFAULTS,
    SDXLFolder,
    SDXLRefinerFolder,
    check_sdxl_components,
    check_sdxl_refiner_components,
)
from refiners_sdxl.unet import SDXL_UNET_FORMAT, SDXLUNet


def _sdxl_autoencoder_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> AutoencoderConfig:
    return replace(autoencoder_config_from_ldm(tensors), scaling_factor=SDXL_AUTOENCODER.scaling_factor)


SDXL_AUTOENCODER_FORMAT = replace(AUTOENCODER_FORMAT, single_file_config=_sdxl_autoencoder_config_from_ldm)
"""SDXL's autoencoder: SD1.5's format, whose single files do not store the scaling factor: SDXL's 0.13025."""

SDXL_REFINER_TEXT_ENCODER_FORMAT = replace(
    SDXL_TEXT_ENCODER_2_FORMAT, single_file_prefix="conditioner.embedders.0.model."
)
"""The SDXL refiner's only text encoder (OpenCLIP ViT-bigG/14, `CLIPTextEncoderG`): `text_encoder_2/` in a diffusers
folder, `conditioner.embedders.0.model.*` in an original single file (the base model's second text encoder's layout
under the first embedder's prefix)."""

_SD15_TEXT_ENCODER = "cond_stage_model."
_BASE_TEXT_ENCODERS = (SDXL_TEXT_ENCODER_FORMAT.single_file_prefix, "conditioner.embedders.1.")


def check_sdxl_base_checkpoint(path: Path, keys: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the file and the key that tells an SD1.5 checkpoint or an SDXL refiner (whose only
    text encoder, OpenCLIP ViT-bigG, is `conditioner.embedders.0.model.*`) from an SDXL base one."""
    for key in keys:
        if key.startswith(_SD15_TEXT_ENCODER):
            raise ValueError(
                f"{path}: '{key}' is Stable Diffusion 1.5's text encoder: load this checkpoint with StableDiffusion_1"
            )
        if key.startswith(SDXL_REFINER_TEXT_ENCODER_FORMAT.single_file_prefix):
            raise ValueError(
                f"{path}: '{key}' is an SDXL refiner's only text encoder (CLIP-G, where a base model has CLIP-L): "
                "not a base model, load it with StableDiffusion_XL_Refiner"
            )


def check_sdxl_refiner_checkpoint(path: Path, keys: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the file and the key that tells an SD1.5 checkpoint or an SDXL base model (CLIP-L as
    `conditioner.embedders.0.transformer.*`, CLIP-G as `conditioner.embedders.1.model.*`) from an SDXL refiner."""
    for key in keys:
        if key.startswith(_SD15_TEXT_ENCODER):
            raise ValueError(
                f"{path}: '{key}' is Stable Diffusion 1.5's text encoder: load this checkpoint with StableDiffusion_1"
            )
        if key.startswith(_BASE_TEXT_ENCODERS):
            raise ValueError(
                f"{path}: '{key}' is a text encoder of an SDXL base model (CLIP-L and CLIP-G, where a refiner has "
                "CLIP-G alone as 'conditioner.embedders.0.model.'): not a refiner, load it with StableDiffusion_XL"
            )


def read_sdxl_single_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> SDXLFolder:
    """The configs of an SDXL base (or inpainting) single-file checkpoint, read from its tensors' shapes and checked
    to fit each other before any weight is loaded; the solver defaults are SDXL's (a single file has no scheduler).

    Raises ValueError naming the file and the key for an SD1.5 checkpoint or a refiner (`check_sdxl_base_checkpoint`),
    naming the file, the components and their widths when they do not fit each other (`check_sdxl_components`);
    WeightsError naming the file for a missing component or shapes that describe no supported config."""
    check_sdxl_base_checkpoint(path, tensors)
    configs = SDXLFolder(
        unet=read_single_file_config(SDXL_UNET_FORMAT, source=path, tensors=tensors),
        text_encoder=read_single_file_config(SDXL_TEXT_ENCODER_FORMAT, source=path, tensors=tensors),
        text_encoder_2=read_single_file_config(SDXL_TEXT_ENCODER_2_FORMAT, source=path, tensors=tensors),
        solver_defaults=dict(SCHEDULER_DEFAULTS),
    )
    _named(path, check_sdxl_components, configs.unet, configs.text_encoder, configs.text_encoder_2)
    return configs


def read_sdxl_refiner_single_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> SDXLRefinerFolder:
    """The configs of an SDXL refiner single-file checkpoint, read from its tensors' shapes and checked to fit each
    other before any weight is loaded; the solver defaults are SDXL's (a single file has no scheduler).

    Raises ValueError naming the file and the key for an SD1.5 checkpoint or an SDXL base model
    (`check_sdxl_refiner_checkpoint`), naming the file, the components and their widths when they do not fit each
    other (`check_sdxl_refiner_components`); WeightsError naming the file for a missing component or shapes that
    describe no supported config."""
    check_sdxl_refiner_checkpoint(path, tensors)
    configs = SDXLRefinerFolder(
        unet=read_single_file_config(SDXL_UNET_FORMAT, source=path, tensors=tensors),
        text_encoder_2=read_single_file_config(SDXL_REFINER_TEXT_ENCODER_FORMAT, source=path, tensors=tensors),
        solver_defaults=dict(SCHEDULER_DEFAULTS),
    )
    _named(path, check_sdxl_refiner_components, configs.unet, configs.text_encoder_2)
    return configs


def load_sdxl_single_file(
    path: Path, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[SDXLUNet, SD1Autoencoder, DoubleTextEncoder]:
    """The four components of an SDXL base single-file checkpoint (see the module's docstring), taking `tensors` as
    their weights (copied only where `dtype` or `device` differ from theirs), after `read_sdxl_single_file`'s checks."""
    read_sdxl_single_file(path, tensors)
    load = partial(load_single_file_component, source=path, tensors=tensors, device=device, dtype=dtype)
    text_encoder_l, text_encoder_g = (
        load(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT),
        load(CLIPTextEncoderG, SDXL_TEXT_ENCODER_2_FORMAT),
    )
    return (
        load(SDXLUNet, SDXL_UNET_FORMAT),
        load(SD1Autoencoder, SDXL_AUTOENCODER_FORMAT),
        DoubleTextEncoder(text_encoder_l, text_encoder_g),
    )


def load_sdxl_refiner_single_file(
    path: Path, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[SDXLUNet, SD1Autoencoder, CLIPTextEncoderG]:
    """The three components of an SDXL refiner single-file checkpoint (see the module's docstring), taking `tensors`
    as their weights (copied only where `dtype` or `device` differ from theirs), after
    `read_sdxl_refiner_single_file`'s checks."""
    read_sdxl_refiner_single_file(path, tensors)
    load = partial(load_single_file_component, source=path, tensors=tensors, device=device, dtype=dtype)
    text_encoder = load(CLIPTextEncoderG, SDXL_REFINER_TEXT_ENCODER_FORMAT)
    return load(SDXLUNet, SDXL_UNET_FORMAT), load(SD1Autoencoder, SDXL_AUTOENCODER_FORMAT), text_encoder


def _named(path: Path, check: Callable[..., None], *configs: object) -> None:
    """`check(*configs)`, its ValueError naming `path`."""
    try:
        check(*configs)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
