"""The full published architecture: SD1.5's UNet and the ControlNet 1.1 config, random weights (zero convolutions
included), saved by diffusers' `save_pretrained` and read back through `SD1UNet.from_pretrained` and
`ControlNet.from_pretrained`. Residuals and the UNet output with them are compared with diffusers' within
max |ours - reference| <= 1e-4 * max |reference| (float32, 16x16 latents and a 128x128 conditioning image)."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from controlnet_references import (
    SD15_CONTROLNET_CONFIG,
    SD15_UNET_CONFIG,
    assert_close,
    assert_residuals_close,
    our_residuals,
    our_unet_output,
    reference_controlnet,
    reference_residuals,
    reference_unet,
    reference_unet_output,
)

from refiners_controlnet import ControlNet, ControlNetAdapter
from refiners_sd15.unet import SD1UNet

SCALE = 0.9


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([801.0]),
        "text": torch.randn(2, 77, 768, generator=generator),
        "condition": torch.rand(2, 3, 128, 128, generator=generator),
    }


@pytest.fixture(scope="module")
def expected(
    inputs: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, tuple[list[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """diffusers' residuals and UNet output; the models are saved, then freed (5 GB in float32, on disk until the
    module's tests are done)."""
    folder = tmp_path_factory.mktemp("published")
    unet = reference_unet(SD15_UNET_CONFIG)
    controlnet = reference_controlnet(SD15_CONTROLNET_CONFIG)
    x, timestep, text = inputs["x"], inputs["timestep"], inputs["text"]
    residuals = reference_residuals(controlnet, x, timestep, text, inputs["condition"])
    scaled = ([residual * SCALE for residual in residuals[0]], residuals[1] * SCALE)  # diffusers' conditioning_scale
    output = reference_unet_output(unet, x, timestep, text, scaled)
    unet.save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    controlnet.save_pretrained(folder / "controlnet")  # pyright: ignore[reportUnknownMemberType]
    del unet, controlnet
    gc.collect()
    yield folder, residuals, output
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def controlnet(expected: tuple[Path, object, object]) -> ControlNet:
    return ControlNet.from_pretrained(expected[0] / "controlnet").eval()


def test_published_controlnet_residuals_match_diffusers(
    inputs: dict[str, torch.Tensor],
    expected: tuple[Path, tuple[list[torch.Tensor], torch.Tensor], torch.Tensor],
    controlnet: ControlNet,
) -> None:
    assert_residuals_close(our_residuals(controlnet, **inputs), expected[1])


def test_published_unet_with_controlnet_matches_diffusers(
    inputs: dict[str, torch.Tensor],
    expected: tuple[Path, tuple[list[torch.Tensor], torch.Tensor], torch.Tensor],
    controlnet: ControlNet,
) -> None:
    unet = SD1UNet.from_pretrained(expected[0]).eval()
    ControlNetAdapter(unet, controlnet, scale=SCALE).inject().set_condition(inputs["condition"])
    assert_close(our_unet_output(unet, inputs["x"], inputs["timestep"], inputs["text"]), expected[2])
