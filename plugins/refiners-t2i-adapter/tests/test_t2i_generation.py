"""A 3-step generation with T2I-Adapters against diffusers' `StableDiffusionAdapterPipeline`.

The reference runs the pipeline (DDIM, classifier-free guidance, a `MultiAdapter` with `adapter_conditioning_scale`
weights for several) with `output_type="latent"`, the same text embeddings, the same condition images (at the
generated size: diffusers resizes them with Lanczos as we do) and the same seeded CPU noise; ours runs
`StableDiffusion_1`'s loop with the DDIM solver and `T2IAdapter`s injected into the UNet. The UNet and adapters are
small ones with random weights, loaded on our side from their `save_pretrained` folders. Final latents must agree
within 1e-3 of max |reference|.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import MultiAdapter, StableDiffusionAdapterPipeline
from diffusers import T2IAdapter as DiffusersT2IAdapter
from PIL import Image

from refiners_core.testing import assert_relative_close
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import our_guided_latents, reference_guided_latents
from refiners_t2i_adapter import T2IAdapter
from refiners_t2i_adapter.testing import (
    SMALL_FULL_ADAPTER,
    SMALL_GRAY_ADAPTER,
    SMALL_LIGHT_ADAPTER,
    SMALL_UNET_CONFIG,
    random_image,
    reference_adapter,
    reference_unet,
    save_adapter,
)

SIZE = 128
STEPS = 3
GUIDANCE = 7.5
TOLERANCE = 1e-3
ADAPTERS = {"full": (SMALL_FULL_ADAPTER, 11), "light": (SMALL_LIGHT_ADAPTER, 12), "gray": (SMALL_GRAY_ADAPTER, 13)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generation")
    reference_unet(SMALL_UNET_CONFIG, seed=10).save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    for name, (config, seed) in ADAPTERS.items():
        save_adapter(reference_adapter(config, seed), folder / name)
    return folder


@pytest.fixture(scope="module")
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.randn(1, 77, 24, generator=generator), torch.randn(1, 77, 24, generator=generator)


def reference_latents(
    folder: Path,
    names: list[str],
    images: list[Image.Image],
    scales: list[float],
    embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    adapters: list[Any] = [DiffusersT2IAdapter.from_pretrained(folder / name) for name in names]
    return reference_guided_latents(
        StableDiffusionAdapterPipeline,
        {
            "unet": reference_unet(SMALL_UNET_CONFIG, seed=10),
            "adapter": MultiAdapter(adapters) if len(adapters) > 1 else adapters[0],
        },
        embeddings,
        images=images,
        scale_argument="adapter_conditioning_scale",
        scales=scales,
        size=SIZE,
        steps=STEPS,
        guidance=GUIDANCE,
    )


def our_latents(
    folder: Path,
    names: list[str],
    images: list[Image.Image],
    scales: list[float],
    embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    def adapt(unet: SD1UNet) -> None:
        for name, image, scale in zip(names, images, scales):
            T2IAdapter.from_pretrained(unet, folder / name, scale=scale).inject().set_condition(image)

    unet = SD1UNet.from_pretrained(folder).eval()
    return our_guided_latents(unet, adapt, embeddings, size=SIZE, steps=STEPS, guidance=GUIDANCE)


@pytest.mark.parametrize(
    "names, scales, modes",
    [(["full"], [0.8], ["RGB"]), (["light", "gray"], [0.9, 0.5], ["RGB", "L"])],
    ids=["full-adapter", "light-and-grayscale-adapters"],
)
def test_generation_with_t2i_adapters_matches_diffusers_pipeline(
    folder: Path,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    names: list[str],
    scales: list[float],
    modes: list[str],
) -> None:
    images = [random_image((SIZE, SIZE), seed, mode) for seed, mode in enumerate(modes)]
    expected = reference_latents(folder, names, images, scales, embeddings)
    if len(names) == 1:  # the adapter does steer the generation
        without = reference_latents(folder, names, images, [0.0], embeddings)
        assert (expected - without).abs().max() > 1e-2 * without.abs().max()
    assert_relative_close(our_latents(folder, names, images, scales, embeddings), expected, TOLERANCE)


def test_the_condition_is_resized_to_the_generated_size_as_diffusers_does(
    folder: Path, embeddings: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """A 200x152 condition for a 128x128 generation: both resize it with Lanczos (diffusers before the adapter)."""
    image = random_image((200, 152), 3)
    expected = reference_latents(folder, ["full"], [image], [1.0], embeddings)
    assert_relative_close(our_latents(folder, ["full"], [image], [1.0], embeddings), expected, TOLERANCE)
