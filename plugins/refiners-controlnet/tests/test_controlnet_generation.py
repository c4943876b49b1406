"""A 3-step generation with ControlNets against diffusers' `StableDiffusionControlNetPipeline`.

The reference runs the pipeline (DDIM, classifier-free guidance with the ControlNet on the doubled batch, guess mode
off) with `output_type="latent"`, the same text embeddings, the same conditioning image(s) and the same seeded CPU
noise; ours runs `StableDiffusion_1`'s loop with the DDIM solver and `ControlNetAdapter`s injected into the UNet.
The UNet and ControlNets are small SD1-like ones with random weights, loaded on our side from their
`save_pretrained` folders. Final latents must agree within 1e-3 of max |reference|.
"""

# pyright: reportPrivateImportUsage=false
# diffusers exports its classes lazily, which pyright reads as private imports.
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from refiners_controlnet import ControlNet, ControlNetAdapter, image_to_condition
from refiners_controlnet.testing import (
    SMALL_CONTROLNET_CONFIG,
    reference_controlnet,
    reference_unet,
)
from refiners_core.testing import assert_relative_close
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG as SMALL_UNET_CONFIG
from refiners_sd15.testing import our_guided_latents, reference_guided_latents

SIZE = 128
STEPS = 3
GUIDANCE = 7.5
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, UNet2DConditionModel, list[ControlNetModel]]:
    folder = tmp_path_factory.mktemp("generation")
    unet = reference_unet(SMALL_UNET_CONFIG, seed=10)
    controlnets = [reference_controlnet(SMALL_CONTROLNET_CONFIG, seed=seed) for seed in (11, 12)]
    unet.save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    for index, controlnet in enumerate(controlnets):
        controlnet.save_pretrained(folder / f"controlnet_{index}")  # pyright: ignore[reportUnknownMemberType]
    return folder, unet, controlnets


@pytest.fixture(scope="module")
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.randn(1, 77, 24, generator=generator), torch.randn(1, 77, 24, generator=generator)


def control_image(seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def reference_latents(
    unet: UNet2DConditionModel,
    controlnets: list[ControlNetModel],
    images: list[Image.Image],
    scales: list[float],
    embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    return reference_guided_latents(
        StableDiffusionControlNetPipeline,
        {"unet": unet, "controlnet": controlnets if len(controlnets) > 1 else controlnets[0]},
        embeddings,
        images=images,
        scale_argument="controlnet_conditioning_scale",
        scales=scales,
        size=SIZE,
        steps=STEPS,
        guidance=GUIDANCE,
    )


def our_latents(
    folder: Path, images: list[Image.Image], scales: list[float], embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    def adapt(unet: SD1UNet) -> None:
        for index, (image, scale) in enumerate(zip(images, scales)):
            controlnet = ControlNet.from_pretrained(folder / f"controlnet_{index}").eval()
            ControlNetAdapter(unet, controlnet, scale=scale).inject().set_condition(image_to_condition(image))

    unet = SD1UNet.from_pretrained(folder).eval()
    return our_guided_latents(unet, adapt, embeddings, size=SIZE, steps=STEPS, guidance=GUIDANCE)


@pytest.mark.parametrize("count, scales", [(1, [0.8]), (2, [0.8, 0.4])], ids=["one-controlnet", "two-controlnets"])
def test_generation_with_controlnets_matches_diffusers_pipeline(
    references: tuple[Path, UNet2DConditionModel, list[ControlNetModel]],
    embeddings: tuple[torch.Tensor, torch.Tensor],
    count: int,
    scales: list[float],
) -> None:
    folder, unet, controlnets = references
    images = [control_image(seed) for seed in range(count)]
    expected = reference_latents(unet, controlnets[:count], images, scales, embeddings)
    if count == 1:  # the ControlNet does steer the generation (the small tests check that each one counts)
        without = reference_latents(unet, controlnets[:count], images, [0.0], embeddings)
        assert (expected - without).abs().max() > 1e-2 * without.abs().max()
    assert_relative_close(our_latents(folder, images, scales, embeddings), expected, TOLERANCE)
