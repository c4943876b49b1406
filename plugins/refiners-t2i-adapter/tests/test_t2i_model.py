"""T2IAdapterModel against diffusers' `T2IAdapter`: each kind, loaded from the published folder layout.

Reference adapters get random weights (biases included) and are written with `save_pretrained` (config.json and
diffusion_pytorch_model.safetensors, or .bin) and read back with `T2IAdapterModel.from_pretrained`, our real loading
path. Features must agree in float32 within 1e-4 of max |reference| each.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError
from refiners_sd15.unet import SD15_UNET
from refiners_sdxl import SDXL_BASE_UNET
from refiners_t2i_adapter import (
    SD15_FULL_ADAPTER,
    SDXL_FULL_ADAPTER,
    T2IAdapterConfig,
    T2IAdapterModel,
    check_fits,
    t2i_adapter_config_from_diffusers,
)
from refiners_t2i_adapter.testing import (
    SD14_COLOR_ADAPTER,
    SD15_CANNY_ADAPTER,
    SDXL_CANNY_ADAPTER,
    SMALL_FULL_ADAPTER,
    SMALL_LIGHT_ADAPTER,
    SMALL_XL_ADAPTER,
    reference_adapter,
    save_adapter,
)

TOLERANCE = 1e-4


@torch.no_grad()
def check_features(config: dict[str, Any], folder: Path, size: tuple[int, int], safe: bool = True) -> None:
    reference = reference_adapter(config)
    model = T2IAdapterModel.from_pretrained(save_adapter(reference, folder, safe=safe)).eval()
    image = torch.rand(2, config["in_channels"], *size, generator=torch.Generator().manual_seed(3))
    expected = reference(image)
    ours = model(image)
    assert len(ours) == len(expected) == len(model.config.features)
    for feature, theirs, (channels, downscale) in zip(ours, expected, model.config.features):
        assert theirs.shape[1:] == (channels, -(-size[0] // downscale), -(-size[1] // downscale))
        assert_relative_close(feature, theirs, TOLERANCE)


@pytest.mark.parametrize(
    "config, size",
    [(SMALL_FULL_ADAPTER, (64, 48)), (SMALL_LIGHT_ADAPTER, (72, 40)), (SMALL_XL_ADAPTER, (64, 96))],
    ids=["full_adapter", "light_adapter", "full_adapter_xl"],
)
def test_features_match_diffusers_t2i_adapter(config: dict[str, Any], size: tuple[int, int], tmp_path: Path) -> None:
    check_features(config, tmp_path, size)


def test_bin_weights_load_through_the_safe_loader(tmp_path: Path) -> None:
    check_features(SMALL_FULL_ADAPTER, tmp_path, (32, 32), safe=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()


def test_the_published_sd15_adapters_match_diffusers_and_fit_sd15(tmp_path: Path) -> None:
    """TencentARC/t2iadapter_canny_sd15v2 (full) and t2iadapter_color_sd14v1 (light) at full size."""
    config = t2i_adapter_config_from_diffusers(SD15_CANNY_ADAPTER)
    assert config == T2IAdapterConfig(in_channels=1) and SD15_FULL_ADAPTER.in_channels == 3
    for published in (SD15_CANNY_ADAPTER, SD14_COLOR_ADAPTER):
        places = check_fits(t2i_adapter_config_from_diffusers(published), SD15_UNET, "published", "SD1UNet")
        assert [place.stage for place in places] == [2, 5, 8, 11]  # before skips 2, 5, 8 and the last one, 11
    check_features(SD15_CANNY_ADAPTER, tmp_path / "canny", (64, 64))
    check_features(SD14_COLOR_ADAPTER, tmp_path / "color", (64, 64))


def test_the_published_sdxl_adapters_fit_sdxl_base_and_not_sd15() -> None:
    config = t2i_adapter_config_from_diffusers(SDXL_CANNY_ADAPTER)
    assert config == replace(SDXL_FULL_ADAPTER, in_channels=3)
    places = check_fits(config, SDXL_BASE_UNET, "canny", "SDXLUNet")
    assert [(place.stage, place.channels, place.downscale) for place in places] == [
        (3, 320, 16),  # after the first level's downsampling
        (5, 640, 16),  # after the second level's last transformer, before its downsampling
        (8, 1280, 32),
        (None, 1280, 32),  # after the middle block
    ]
    with pytest.raises(ValueError, match=r"feature 0 has 320 channels at 1/16 of the image size, the UNet takes 320"):
        check_fits(config, SD15_UNET, "canny", "SD1UNet")


def test_save_and_reload_keeps_the_config_and_every_weight(tmp_path: Path) -> None:
    model = T2IAdapterModel.from_pretrained(save_adapter(reference_adapter(SMALL_LIGHT_ADAPTER), tmp_path / "light"))
    model.save(tmp_path / "light.safetensors")
    again = T2IAdapterModel.from_pretrained(tmp_path / "light.safetensors")
    assert again.config == model.config and again.config.adapter_type == "light_adapter"
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"_class_name": "ControlNetModel"}, "_class_name='ControlNetModel' is a ControlNet"),
        ({"adapter_type": "huge_adapter"}, "adapter_type must be one of"),
        ({"channels": [32, 0]}, r"channels\[1\] must be a positive integer, got 0"),
        ({"adapter_type": "full_adapter_xl"}, "channels of a full_adapter_xl must be 4 values"),
        ({"in_channels": "3"}, "in_channels must be a positive integer"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        t2i_adapter_config_from_diffusers({**SMALL_FULL_ADAPTER, **changes})


def test_weights_of_another_kind_are_refused_naming_the_file(tmp_path: Path) -> None:
    folder = save_adapter(reference_adapter(SMALL_FULL_ADAPTER), tmp_path / "adapter")
    (folder / "config.json").write_text('{"_class_name": "T2IAdapter", "channels": [32, 64, 64, 64]}')
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        T2IAdapterModel.from_pretrained(folder)
