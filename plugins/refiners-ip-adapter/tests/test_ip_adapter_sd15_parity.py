"""IP-Adapter on SD1.5 against diffusers' `load_ip_adapter`, on a small SD1-like UNet and a small ViT-H-like image
encoder with random weights saved in the released layout (`image_proj.*` / `ip_adapter.*`, `.safetensors` and `.bin`):

- image embeddings (diffusers' `prepare_ip_adapter_image_embeds` through the UNet's `encoder_hid_proj`, tokens of the
  images side by side) within max |ours - reference| <= 1e-4 * max |reference|;
- a 3-step DDIM generation with classifier-free guidance (`StableDiffusionPipeline` with `ip_adapter_image`,
  `output_type="latent"`, the same text embeddings and seeded CPU noise), final latents within 1e-3.

`linear` is the shape of ip-adapter_sd15 (and _light): 4 tokens from the projected image embedding; `perceiver` the
shape of ip-adapter-plus_sd15 (and plus-face): 16 queries resampling the penultimate hidden states.
"""

# pyright: reportPrivateImportUsage=false
# diffusers exports its classes lazily, which pyright reads as private imports.
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from refiners_clip_vision.testing import SMALL_VIT_H, randomize
from refiners_core.testing import assert_relative_close
from refiners_ip_adapter import IPAdapter, text_cross_attentions
from refiners_ip_adapter.testing import SMALL_SD15_UNET, released_weights, write_release_folder
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import our_guided_latents, pipeline_latents

SIZE = 128
STEPS = 3
GUIDANCE = 7.5
TEXT_DIM = SMALL_SD15_UNET["cross_attention_dim"]


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    unet = UNet2DConditionModel(**SMALL_SD15_UNET).eval()
    randomize(unet, seed=10)
    unet.save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    return folder


def release(folder: Path, projection: str, suffix: str) -> Path:
    unet = SD1UNet.from_pretrained(folder)
    tensors = released_weights(
        projection,  # pyright: ignore[reportArgumentType]
        image_embedding_dim=SMALL_VIT_H.projection_dim if projection == "linear" else SMALL_VIT_H.embedding_dim,
        cross_attention_dim=TEXT_DIM,
        inner_dims=[attention.inner_dim for attention in text_cross_attentions(unet)],
        num_tokens=4 if projection == "linear" else 16,
        seed=20,
    )
    name = f"ip-adapter.{suffix}"
    return write_release_folder(folder / f"{projection}-{suffix}", name, tensors, SMALL_VIT_H, seed=21)


def reference_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(count)
    sizes = [(80, 64), (64, 100)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:count]]


def reference_pipeline(unet_folder: Path, weights: Path) -> Any:
    unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet").eval()  # pyright: ignore[reportUnknownMemberType]
    vae = AutoencoderKL(  # unused with output_type="latent", but its 4 levels make the latents 1/8 of the image
        block_out_channels=(32,) * 4,  # pyright: ignore[reportArgumentType]
        down_block_types=("DownEncoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
        up_block_types=("UpDecoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    scheduler.register_to_config(steps_offset=1)
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,  # pyright: ignore[reportArgumentType]
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        unet=cast(Any, unet),
        scheduler=scheduler,  # pyright: ignore[reportArgumentType]
        safety_checker=None,  # pyright: ignore[reportArgumentType]
        feature_extractor=None,  # pyright: ignore[reportArgumentType]
        image_encoder=None,  # pyright: ignore[reportArgumentType]
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, low_cpu_mem_usage=False)
    return pipe


def reference_embedding(pipe: Any, images: list[Image.Image]) -> torch.Tensor:
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds([images], None, "cpu", 1, True)
        (tokens,) = pipe.unet.encoder_hid_proj(embeds)
    return tokens.reshape(2, -1, tokens.shape[-1])


@pytest.mark.parametrize(
    "projection, suffix, count",
    [("linear", "safetensors", 1), ("linear", "bin", 2), ("perceiver", "safetensors", 2), ("perceiver", "bin", 1)],
)
def test_image_embedding_matches_diffusers(unet_folder: Path, projection: str, suffix: str, count: int) -> None:
    weights = release(unet_folder, projection, suffix)
    images = reference_images(count)
    expected = reference_embedding(reference_pipeline(unet_folder, weights), images)
    ip = IPAdapter.from_pretrained(SD1UNet.from_pretrained(unet_folder), weights)
    ours = ip.compute_image_embedding(images)
    assert ours.shape == (2, count * (4 if projection == "linear" else 16), TEXT_DIM)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # the negative half differs from the image's
    assert_relative_close(ours, expected, 1e-4)


def reference_latents(
    pipe: Any, images: list[Image.Image], scale: float, text: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    pipe.set_ip_adapter_scale(scale)
    return pipeline_latents(pipe, text, size=SIZE, steps=STEPS, guidance=GUIDANCE, ip_adapter_image=[images])


def our_latents(
    unet_folder: Path, weights: Path, images: list[Image.Image], scale: float, text: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    def adapt(unet: SD1UNet) -> None:
        ip = IPAdapter.from_pretrained(unet, weights, scale=scale).inject()
        ip.set_image_embedding(ip.compute_image_embedding(images))

    unet = SD1UNet.from_pretrained(unet_folder).eval()
    return our_guided_latents(unet, adapt, text, size=SIZE, steps=STEPS, guidance=GUIDANCE)


@pytest.mark.parametrize("projection, count", [("linear", 1), ("perceiver", 2)])
def test_generation_with_ip_adapter_matches_diffusers_pipeline(unet_folder: Path, projection: str, count: int) -> None:
    weights = release(unet_folder, projection, "safetensors")
    generator = torch.Generator().manual_seed(4)
    text = (torch.randn(1, 77, TEXT_DIM, generator=generator), torch.randn(1, 77, TEXT_DIM, generator=generator))
    images = reference_images(count)
    pipe = reference_pipeline(unet_folder, weights)
    expected = reference_latents(pipe, images, 0.7, text)
    without = reference_latents(pipe, images, 0.0, text)
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the images steer the generation
    assert_relative_close(our_latents(unet_folder, weights, images, 0.7, text), expected, 1e-3)
