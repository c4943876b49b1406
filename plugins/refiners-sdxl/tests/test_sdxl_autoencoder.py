"""SDXL's autoencoder is refiners-sd15's `SD1Autoencoder` built from `SDXL_AUTOENCODER` (latents scaled by 0.13025).

Reference: diffusers' `AutoencoderKL` with the published `vae/config.json` of stabilityai/stable-diffusion-xl-base-1.0
(the full architecture, every parameter perturbed), written with `save_pretrained` and loaded through
`SD1Autoencoder.from_pretrained`. Latents and images must agree within 1e-4 of max |reference| (64x64 images).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]

from refiners_core.testing import assert_relative_close
from refiners_sd15 import SD1Autoencoder
from refiners_sdxl import SDXL_AUTOENCODER
from refiners_sdxl.testing import SDXL_VAE_CONFIG

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoencoderKL, Path]:
    torch.manual_seed(0)
    config = {key: value for key, value in SDXL_VAE_CONFIG.items() if not key.startswith("_")}
    vae = AutoencoderKL(**config).eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    folder = tmp_path_factory.mktemp("sdxl") / "vae"
    vae.save_pretrained(folder)
    return vae, folder


@torch.no_grad()
def test_full_sdxl_autoencoder_loaded_from_diffusers_matches_with_its_scaling_factor(
    references: tuple[AutoencoderKL, Path],
) -> None:
    reference, folder = references
    ours = SD1Autoencoder.from_pretrained(folder, subfolder="").eval()
    assert ours.config == SDXL_AUTOENCODER
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1

    expected_latents = reference.encode(images).latent_dist.mean * 0.13025  # pyright: ignore[reportAttributeAccessIssue]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected_images = reference.decode(latents / 0.13025).sample  # pyright: ignore
    assert 0.1 < expected_latents.abs().max().item() and 0.1 < expected_images.abs().max().item()

    assert_relative_close(ours.encode(images), expected_latents, TOLERANCE)
    assert_relative_close(ours.decode(latents), expected_images, TOLERANCE)
