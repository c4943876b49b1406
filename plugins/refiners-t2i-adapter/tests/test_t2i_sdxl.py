"""T2IAdapter with SDXL (refiners-sdxl's SDXLUNet and StableDiffusion_XL) against diffusers.

A small SDXL-like UNet with SDXL's three kinds of level (see `refiners_t2i_adapter.testing.SMALL_SDXL_UNET_CONFIG`)
and a small `full_adapter_xl` with random weights, written with `save_pretrained` and read back by our loaders. One
UNet call must match `UNet2DConditionModel` with `down_intrablock_additional_residuals` (the fourth feature after the
middle block) within 1e-4 of max |reference|; 3 guided DDIM steps must match `StableDiffusionXLAdapterPipeline`
within 1e-3.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers import T2IAdapter as DiffusersT2IAdapter
from PIL import Image

from refiners_core.cli import main
from refiners_core.testing import assert_relative_close
from refiners_sd15 import DDIM
from refiners_sdxl import SDXLUNet, StableDiffusion_XL
from refiners_sdxl.testing import (
    POOLED_DIM,
    TIME_ID_DIM,
    assert_adapted_steps_match_pipeline,
    ddim_pipeline_components,
    small_sdxl_pipeline,
)
from refiners_t2i_adapter import T2IAdapter, image_to_tensor
from refiners_t2i_adapter.testing import (
    SMALL_FULL_ADAPTER,
    SMALL_SDXL_UNET_CONFIG,
    SMALL_XL_ADAPTER,
    random_image,
    reference_adapter,
    reference_unet,
    save_adapter,
)

SIZE = 64  # pixels: 8x8 latents, features of 4x4, 4x4, 2x2 and 2x2
STEPS = 3
GUIDANCE = 5.0


@dataclass
class Reference:
    pipeline: StableDiffusionXLPipeline
    folder: Path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    folder = tmp_path_factory.mktemp("sdxl")
    components = small_sdxl_pipeline().components
    components["unet"] = reference_unet(SMALL_SDXL_UNET_CONFIG, seed=20)
    pipeline = StableDiffusionXLPipeline(**components)
    pipeline.save_pretrained(folder / "model")
    save_adapter(reference_adapter(SMALL_XL_ADAPTER, 21), folder / "xl")
    save_adapter(reference_adapter(SMALL_FULL_ADAPTER, 22), folder / "sd15")
    return Reference(pipeline, folder)


def edges(seed: int = 0) -> Image.Image:
    return random_image((SIZE, SIZE), seed, "L")


@torch.no_grad()
def test_one_sdxl_unet_call_matches_diffusers_intrablock_residuals(reference: Reference) -> None:
    unet = SDXLUNet.from_pretrained(reference.folder / "model").eval()
    T2IAdapter.from_pretrained(unet, reference.folder / "xl", scale=0.7).inject().set_condition(edges())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    text = torch.randn(2, 77, SMALL_SDXL_UNET_CONFIG["cross_attention_dim"], generator=generator)
    pooled = torch.randn(2, POOLED_DIM, generator=generator)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
    timestep = torch.tensor([400.0])
    adapter: Any = DiffusersT2IAdapter.from_pretrained(reference.folder / "xl")
    # one per latent, as the pipeline repeats them: diffusers adds the fourth only if its shape is the middle block's
    features = [0.7 * feature.repeat(2, 1, 1, 1) for feature in adapter(image_to_tensor(edges()))]
    theirs: Any = UNet2DConditionModel.from_pretrained(reference.folder / "model", subfolder="unet")
    conditions = {"text_embeds": pooled, "time_ids": time_ids}
    expected = theirs(
        x, timestep, text, added_cond_kwargs=conditions, down_intrablock_additional_residuals=features
    ).sample
    without = theirs(x, timestep, text, added_cond_kwargs=conditions).sample
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    unet.set_pooled_text_embedding(pooled)
    unet.set_time_ids(time_ids)
    assert TIME_ID_DIM * 6 + POOLED_DIM == SMALL_SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"]
    assert_relative_close(unet(x), expected, 1e-4)


@torch.no_grad()
def test_three_guided_steps_match_stable_diffusion_xl_adapter_pipeline(reference: Reference) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(reference.folder / "model")
    sdxl.show_progress = False
    sdxl.solver = DDIM(num_inference_steps=STEPS, **sdxl.solver_defaults)
    T2IAdapter.from_pretrained(sdxl.unet, reference.folder / "xl", scale=0.8).inject().set_condition(edges())
    pipeline = StableDiffusionXLAdapterPipeline(
        **ddim_pipeline_components(reference.pipeline),
        adapter=DiffusersT2IAdapter.from_pretrained(reference.folder / "xl"),
    )
    assert_adapted_steps_match_pipeline(
        sdxl,
        pipeline,
        image=edges(),
        scale_argument="adapter_conditioning_scale",
        scale=0.8,
        off=0.0,
        steps=STEPS,
        guidance=GUIDANCE,
        size=SIZE,
    )


def test_an_sd15_adapter_on_an_sdxl_unet_is_refused_naming_it(reference: Reference) -> None:
    unet = SDXLUNet.from_pretrained(reference.folder / "model")
    tree = repr(unet)
    with pytest.raises(ValueError, match=r"the T2I-Adapter .*sd15 \(adapter_type='full_adapter'.*an SDXL UNet"):
        T2IAdapter.from_pretrained(unet, reference.folder / "sd15")
    assert repr(unet) == tree


def test_refiners_generate_runs_sdxl_with_a_t2i_adapter(
    reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edges().save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    arguments = ["generate", "a cat", "--model", str(reference.folder / "model"), "--steps", "2", "--size", "64x64"]
    option = ["--t2i-adapter", f"{reference.folder / 'xl'}:{tmp_path / 'edges.png'}:0.5"]
    assert main([*arguments, *option, "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (SIZE, SIZE)


@torch.no_grad()
def test_a_size_the_sdxl_adapter_cannot_read_is_named(reference: Reference) -> None:
    unet = SDXLUNet.from_pretrained(reference.folder / "model").eval()
    T2IAdapter.from_pretrained(unet, reference.folder / "xl").inject().set_condition(edges())
    unet.set_timestep(torch.tensor([400.0]))
    unet.set_clip_text_embedding(torch.zeros(1, 77, SMALL_SDXL_UNET_CONFIG["cross_attention_dim"]))
    unet.set_pooled_text_embedding(torch.zeros(1, POOLED_DIM))
    unet.set_time_ids(torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32))
    with pytest.raises(
        ValueError, match="condition image is 64x72: each side must be a multiple of its downscale_factor 16"
    ):
        unet(torch.zeros(1, 4, 9, 8))  # a 64x72 image: 72 is not a multiple of 16
