"""FreeU on refiners-sdxl's SDXLUNet against diffusers' `UNet2DConditionModel.enable_freeu` and the
`StableDiffusionXLPipeline` with `enable_freeu`.

The references have random weights (refiners-sdxl's `random_diffusers_model`); ours load the folders their
`save_pretrained` writes. One UNet call must match within 1e-4 of max |reference| (small SDXL-like UNet with three
levels, and the full published SDXL base UNet once), 3 guided DDIM steps within 1e-3. Each comparison also checks that
FreeU changes the reference by far more than the tolerance.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

import gc
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from refiners_core.cli import main
from refiners_core.testing import assert_relative_close, relative_error
from refiners_freeu import SD15_SCALES, SDXL_SCALES, FreeU, FreeUAdapter, default_scales
from refiners_freeu.options import apply_freeu_option
from refiners_sd15 import DDIM
from refiners_sd15.unet import unet_config_from_diffusers
from refiners_sdxl import SDXLUNet, StableDiffusion_XL
from refiners_sdxl.testing import (
    POOLED_DIM,
    SDXL_BASE_UNET_CONFIG,
    SMALL_THREE_LEVEL_UNET,
    SMALL_UNET,
    ddim_pipeline_components,
    guided_latents,
    guided_pipeline_arguments,
    random_diffusers_model,
    small_sdxl_pipeline,
)

SIZE = 64  # pixels: 8x8 latents
THREE_LEVELS: dict[str, Any] = {**SMALL_THREE_LEVEL_UNET, "transformer_layers_per_block": [1, 2, 2]}
"""A small SDXL-like UNet of three levels, as SDXL base: FreeU applies to the first two decoder levels only."""


class Inputs:
    """A latent, a timestep and SDXL's three conditionings, for one UNet call on both sides."""

    def __init__(self, text_dim: int, pooled_dim: int, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(1, 4, size, size, generator=generator)
        self.timestep = torch.tensor([700.0])
        self.text = torch.randn(1, 77, text_dim, generator=generator)
        self.pooled = torch.randn(1, pooled_dim, generator=generator)
        self.time_ids = torch.tensor([[8.0 * size, 8.0 * size, 0.0, 0.0, 8.0 * size, 8.0 * size]])

    @torch.no_grad()
    def reference(self, unet: Any, **freeu: float) -> torch.Tensor:
        if freeu:
            unet.enable_freeu(**freeu)
        try:
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
            return unet(self.x, self.timestep, self.text, added_cond_kwargs=added).sample
        finally:
            unet.disable_freeu()

    @torch.no_grad()
    def ours(self, unet: SDXLUNet) -> torch.Tensor:
        unet.set_timestep(self.timestep)
        unet.set_clip_text_embedding(self.text)
        unet.set_pooled_text_embedding(self.pooled)
        unet.set_time_ids(self.time_ids)
        return unet(self.x)


def test_sdxl_default_factors_are_the_published_ones() -> None:
    assert SDXL_SCALES == {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}
    unet = SDXLUNet(unet_config_from_diffusers(THREE_LEVELS), device="meta")
    assert default_scales(unet) == SDXL_SCALES
    assert FreeU(unet).scales == SDXL_SCALES
    assert FreeU(unet, b1=1.1).scales == {**SDXL_SCALES, "b1": 1.1}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    reference = random_diffusers_model(UNet2DConditionModel, THREE_LEVELS, seed=3)
    folder = tmp_path_factory.mktemp("freeu_sdxl")
    reference.save_pretrained(folder / "unet")
    return reference, folder


@pytest.mark.parametrize("scales", [SDXL_SCALES, {"s1": 0.5, "s2": 1.5, "b1": 0.7, "b2": 1.8}])
def test_small_sdxl_unet_with_freeu_matches_diffusers(small: tuple[Any, Path], scales: dict[str, float]) -> None:
    reference, folder = small
    inputs = Inputs(SMALL_UNET["cross_attention_dim"], POOLED_DIM, 16, seed=4)
    expected, without = inputs.reference(reference, **scales), inputs.reference(reference)
    unet = SDXLUNet.from_pretrained(folder).eval()
    before, state = inputs.ours(unet), {key: value.clone() for key, value in unet.state_dict().items()}
    freeu = FreeU(unet, **scales).inject()
    assert len(freeu.adapters) == 4  # two levels of layers_per_block + 1 = 2 skip connections each
    assert_relative_close(inputs.ours(unet), expected, 1e-4)
    assert relative_error(without, expected) > 10 * 1e-4, "FreeU barely changes the reference: a weak test"
    freeu.eject()
    assert torch.equal(inputs.ours(unet), before)
    assert all(torch.equal(value, state[key]) for key, value in unet.state_dict().items())


def test_full_published_sdxl_unet_with_freeu_matches_diffusers(tmp_path: Path) -> None:
    """The published SDXL base UNet (10.3 GB in float32), one at a time: the reference's outputs are computed, it is
    written in 1 GB shards and freed, then ours is loaded memory-mapped from that folder (deleted at the end)."""
    inputs = Inputs(2048, 1280, 32, seed=5)  # 32x32 latents: the first two decoder levels at 8x8 and 16x16
    reference = random_diffusers_model(UNet2DConditionModel, SDXL_BASE_UNET_CONFIG, seed=6)
    expected, without = inputs.reference(reference, **SDXL_SCALES), inputs.reference(reference)
    try:
        reference.save_pretrained(tmp_path / "unet", max_shard_size="1GB")
        del reference
        gc.collect()
        unet = SDXLUNet.from_pretrained(tmp_path).eval()
        FreeU(unet).inject()  # the SDXL defaults
        assert_relative_close(inputs.ours(unet), expected, 1e-4)
        assert relative_error(without, expected) > 10 * 1e-4, "FreeU barely changes the reference: a weak test"
        del unet
        gc.collect()
    finally:
        shutil.rmtree(tmp_path / "unet", ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    folder = tmp_path_factory.mktemp("freeu_sdxl_pipeline")
    pipeline = small_sdxl_pipeline()
    pipeline.save_pretrained(folder)
    return pipeline, folder


@torch.no_grad()
def test_three_guided_steps_with_freeu_match_stable_diffusion_xl_pipeline(pipeline_folder: tuple[Any, Path]) -> None:
    reference, folder = pipeline_folder
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    sdxl.show_progress = False
    sdxl.solver = DDIM(num_inference_steps=3, **sdxl.solver_defaults)
    FreeU(sdxl.unet).inject()
    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))

    pipeline: Any = StableDiffusionXLPipeline(**ddim_pipeline_components(reference), add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    arguments: dict[str, Any] = guided_pipeline_arguments(embedding, pooled, steps=3, guidance_scale=5.0, size=SIZE)
    without: torch.Tensor = pipeline(**arguments, latents=noise.clone()).images
    pipeline.enable_freeu(**SDXL_SCALES)
    expected: torch.Tensor = pipeline(**arguments, latents=noise.clone()).images
    pipeline.disable_freeu()

    x = guided_latents(sdxl, noise, embedding, pooled, size=SIZE, condition_scale=5.0)
    assert_relative_close(x, expected, 1e-3)
    assert relative_error(without, expected) > 10 * 1e-3, "FreeU barely changes the reference: a weak test"


def test_freeu_option_default_gives_each_model_its_factors() -> None:
    sdxl_unet = SDXLUNet(unet_config_from_diffusers(THREE_LEVELS), device="meta")
    apply_freeu_option(SimpleNamespace(unet=sdxl_unet), ["default"])
    adapters = list(sdxl_unet.layers(FreeUAdapter))
    assert [adapter.backbone_scale for adapter in adapters] == [SDXL_SCALES["b1"]] * 2 + [SDXL_SCALES["b2"]] * 2
    assert SD15_SCALES["b1"] != SDXL_SCALES["b1"]


def test_refiners_generate_runs_sdxl_with_freeu(
    pipeline_folder: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    arguments = ["generate", "a cat", "--model", str(pipeline_folder[1]), "--steps", "2", "--size", "64x64"]
    assert main([*arguments, "--freeu", "default", "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE)
