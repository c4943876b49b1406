"""SDXL's original single-file checkpoints (`sd_xl_base_1.0.safetensors`): `model.diffusion_model.*` (UNet),
`conditioner.embedders.0.transformer.*` (CLIP-L, transformers names), `conditioner.embedders.1.model.*` (OpenCLIP
ViT-bigG, OpenCLIP names) and `first_stage_model.*` (autoencoder), each config read from the tensors' shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from refiners_sd15.autoencoder import AUTOENCODER_FORMAT, SD1Autoencoder, autoencoder_config_from_ldm
from refiners_sd15.clip import (
    SDXL_TEXT_ENCODER_2_FORMAT,
    SDXL_TEXT_ENCODER_FORMAT,
    CLIPTextEncoderG,
    CLIPTextEncoderL,
    DoubleTextEncoder,
)
from refiners_sd15.loading import load_single_file_component
from refiners_sdxl.config import SDXL_AUTOENCODER
from refiners_sdxl.unet import SDXL_UNET_FORMAT, SDXLUNet

SDXL_AUTOENCODER_FORMAT = replace(
    AUTOENCODER_FORMAT,
    single_file_config=lambda tensors: replace(
        autoencoder_config_from_ldm(tensors), scaling_factor=SDXL_AUTOENCODER.scaling_factor
    ),
)
"""SDXL's autoencoder: SD1.5's format, whose single files do not store the scaling factor: SDXL's 0.13025."""

_SD15_TEXT_ENCODER = "cond_stage_model."
_REFINER_TEXT_ENCODER = "conditioner.embedders.0.model."


def check_sdxl_base_checkpoint(path: Path, keys: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the file and the key that tells an SD1.5 checkpoint or an SDXL refiner (whose only
    text encoder, OpenCLIP ViT-bigG, is `conditioner.embedders.0.model.*`) from an SDXL base one."""
    for key in keys:
        if key.startswith(_SD15_TEXT_ENCODER):
            raise ValueError(
                f"{path}: '{key}' is Stable Diffusion 1.5's text encoder: load this checkpoint with StableDiffusion_1"
            )
        if key.startswith(_REFINER_TEXT_ENCODER):
            raise ValueError(f"{path}: '{key}' is an SDXL refiner's only text encoder (CLIP-G): not a base model")


def load_sdxl_single_file(
    path: Path, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[SDXLUNet, SD1Autoencoder, DoubleTextEncoder]:
    """The four components of an SDXL base single-file checkpoint (see the module's docstring), memory-mapped."""
    check_sdxl_base_checkpoint(path, tensors)
    options = {"source": path, "tensors": tensors, "device": device, "dtype": dtype}
    return (
        load_single_file_component(SDXLUNet, SDXL_UNET_FORMAT, **options),
        load_single_file_component(SD1Autoencoder, SDXL_AUTOENCODER_FORMAT, **options),
        DoubleTextEncoder(
            load_single_file_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, **options),
            load_single_file_component(CLIPTextEncoderG, SDXL_TEXT_ENCODER_2_FORMAT, **options),
        ),
    )
