"""IP-Adapter on SDXL against diffusers' `load_ip_adapter` and `StableDiffusionXLPipeline`, on refiners-sdxl's small
SDXL-like pipeline (random weights) and small image encoders, with random IP-Adapter weights in the released layout:
image embeddings within max |ours - reference| <= 1e-4 * max |reference|, and a 3-step DDIM generation with
classifier-free guidance within 1e-3.

The three SDXL kinds, at small sizes: `ip-adapter_sdxl` (linear projection of a ViT-bigG-like encoder's image
embedding), `ip-adapter_sdxl_vit-h` (the same of a ViT-H-like one) and `ip-adapter-plus_sdxl_vit-h` (a Perceiver
resampler over a ViT-H-like encoder's penultimate hidden states).
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from refiners_clip_vision import CLIPImageEncoderConfig
from refiners_clip_vision.testing import SMALL_VIT_BIGG, SMALL_VIT_H
from refiners_core.testing import assert_relative_close
from refiners_ip_adapter import IPAdapter, text_cross_attentions
from refiners_ip_adapter.testing import released_weights, write_release_folder
from refiners_sd15 import DDIM
from refiners_sdxl import StableDiffusion_XL
from refiners_sdxl.testing import (
    G_DIM,
    L_DIM,
    guided_latents,
    guided_pipeline_arguments,
    small_sdxl_pipeline,
    write_small_sdxl_folder,
)

SIZE = 64
KINDS = {
    "ip-adapter_sdxl": ("linear", SMALL_VIT_BIGG),
    "ip-adapter_sdxl_vit-h": ("linear", SMALL_VIT_H),
    "ip-adapter-plus_sdxl_vit-h": ("perceiver", SMALL_VIT_H),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def release(folder: Path, sdxl: StableDiffusion_XL, kind: str) -> Path:
    projection, encoder = cast(tuple[str, CLIPImageEncoderConfig], KINDS[kind])
    tensors = released_weights(
        projection,  # pyright: ignore[reportArgumentType]
        image_embedding_dim=encoder.projection_dim if projection == "linear" else encoder.embedding_dim,
        cross_attention_dim=L_DIM + G_DIM,
        inner_dims=[attention.inner_dim for attention in text_cross_attentions(sdxl.unet)],
        num_tokens=4 if projection == "linear" else 16,
        seed=30,
    )
    return write_release_folder(folder / kind, "ip-adapter.safetensors", tensors, encoder, seed=31)


def reference_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((70, 50), (40, 60))]


@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_sdxl_ip_adapter_matches_diffusers(folder: Path, kind: str) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    sdxl.show_progress = False
    weights = release(folder, sdxl, kind)
    images = reference_images()

    pipeline: Any = small_sdxl_pipeline()
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    pipeline.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, low_cpu_mem_usage=False)
    embeds = pipeline.prepare_ip_adapter_image_embeds([images], None, "cpu", 1, True)
    (tokens,) = pipeline.unet.encoder_hid_proj(embeds)
    expected_embedding = tokens.reshape(2, -1, tokens.shape[-1])

    ip = IPAdapter.from_pretrained(sdxl.unet, weights, scale=0.6)
    assert ip.weights.kind is None  # small widths: no released kind, the same code
    embedding = ip.compute_image_embedding(images)
    assert_relative_close(embedding, expected_embedding, 1e-4)

    text, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    pipeline.set_ip_adapter_scale(0.6)
    arguments: dict[str, Any] = guided_pipeline_arguments(text, pooled, steps=3, guidance_scale=5.0, size=SIZE)
    expected = pipeline(ip_adapter_image=[images], latents=noise.clone(), **arguments).images
    pipeline.set_ip_adapter_scale(0.0)
    without = pipeline(ip_adapter_image=[images], latents=noise.clone(), **arguments).images
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the images steer the generation

    ip.inject().set_image_embedding(embedding)
    sdxl.solver = DDIM(num_inference_steps=3, **sdxl.solver_defaults)
    x = guided_latents(sdxl, noise, text, pooled, size=SIZE, condition_scale=5.0)
    assert_relative_close(x, expected, 1e-3)


def test_generate_sdxl_with_an_ip_adapter(folder: Path, tmp_path: Path) -> None:
    from refiners_core.cli import main
    from refiners_core.plugins import registry

    assert registry(reload=True).generate_options["--ip-adapter"].applies_to("sdxl")
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    weights = release(tmp_path, sdxl, "ip-adapter_sdxl")
    reference_images()[0].save(tmp_path / "reference.png")
    common = ["generate", "a cat", "--model", str(folder), "--steps", "2", "--size", "64x64", "--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    option = f"{weights}:{tmp_path / 'reference.png'}:0.9"
    assert main([*common, "--ip-adapter", option, "--out", str(tmp_path / "ip.png")]) == 0
    plain, steered = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("plain.png", "ip.png"))
    assert np.abs(plain - steered).max() > 0
