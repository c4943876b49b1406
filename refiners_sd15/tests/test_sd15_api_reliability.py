"""The SD1.5 Python API on bad input: sizes, steps, scales, noise, seeds, prompts, images and masks are refused
before anything is allocated or computed, and images and masks are read by what their pixels mean."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_sd15 import (
    SD15_INPAINTING_UNET,
    DPMSolver,
    SD1UNet,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners_sd15.demo import small_stable_diffusion


@pytest.fixture(scope="module")
def sd() -> StableDiffusion_1:
    model = small_stable_diffusion(seed=0)
    model.solver = DPMSolver(num_inference_steps=3)
    return model


@pytest.fixture(scope="module")
def inpainting(sd: StableDiffusion_1) -> StableDiffusion_1_Inpainting:
    torch.manual_seed(0)
    unet = SD1UNet(replace(SD15_INPAINTING_UNET, **{**sd.unet.config.__dict__, "in_channels": 9}))
    return StableDiffusion_1_Inpainting(unet=unet, lda=sd.lda, clip_text_encoder=sd.clip_text_encoder).eval()


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((100_000, 100_000), "init_latents size 100000x100000 .*each side must be at most 8192"),
        ((8192, 4096), "has 33554432 pixels, more than the 16777216"),
        ((2**40, 8), "each side must be at most 8192"),
        ((0, 64), "each side must be a positive multiple of 8"),
        ((-64, 64), "each side must be a positive multiple of 8"),
        ((60, 64), "each side must be a positive multiple of 8"),
        ((64.0, 64), "must be integers"),
        ((64,), r"size must be \(height, width\), got \(64,\)"),
    ],
)
def test_init_latents_refuses_a_size_before_allocating(sd: StableDiffusion_1, size: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sd.init_latents(size=size, seed=0)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"noise": torch.full((1, 4, 8, 8), float("nan"))}, ValueError, "noise has 256 NaN and 0 infinite values"),
        ({"noise": torch.zeros(1, 4, 8, 8).index_fill_(3, torch.tensor([2]), float("inf"))}, ValueError, "32 infinite"),
        ({"noise": torch.zeros(1, 4, 8, 9)}, ValueError, "noise must have shape"),
        ({"seed": -1}, ValueError, "seed must be an integer from 0 to 2\\*\\*64-1, got -1"),
        ({"seed": 2**64}, ValueError, "seed must be an integer from 0 to 2\\*\\*64-1"),
        ({"seed": 1.5}, ValueError, "seed must be an integer"),
        ({"seed": True}, ValueError, "seed must be an integer"),
        ({"init_image": Image.new("L", (9000, 8))}, ValueError, "init_image is 9000x8 .*from 1 to 8192 pixels"),
        ({"init_image": Image.new("RGB", (0, 0))}, ValueError, "init_image is 0x0"),
        ({"init_image": np.zeros((64, 64, 3))}, TypeError, "must be a PIL.Image.Image, got ndarray"),
    ],
)
def test_init_latents_refuses_bad_noise_seeds_and_images(
    sd: StableDiffusion_1, arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sd.init_latents(size=(64, 64), **arguments)


def test_init_latents_accepts_the_extreme_seeds(sd: StableDiffusion_1) -> None:
    first, last = sd.init_latents(size=(64, 64), seed=0), sd.init_latents(size=(64, 64), seed=2**64 - 1)
    assert first.isfinite().all() and last.isfinite().all() and not torch.equal(first, last)


@pytest.mark.parametrize("step", [-1, -3, 3, 1000, 1.0, True, "0", None])
def test_a_step_that_is_not_one_of_the_solvers_is_refused(sd: StableDiffusion_1, step: Any) -> None:
    x = sd.init_latents(size=(64, 64), seed=0)
    embedding = sd.compute_clip_text_embedding("a cat")
    with pytest.raises(ValueError, match=r"step must be an integer from 0 to 2 \(the solver's steps\)"):
        sd(x, step=step, clip_text_embedding=embedding)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), "7.5x"])
def test_a_condition_scale_that_is_not_finite_is_refused(sd: StableDiffusion_1, scale: Any) -> None:
    x = sd.init_latents(size=(64, 64), seed=0)
    embedding = sd.compute_clip_text_embedding("a cat")
    with pytest.raises(ValueError, match="condition_scale must be a finite number"):
        sd(x, step=0, clip_text_embedding=embedding, condition_scale=scale)


@pytest.mark.parametrize(
    ("text", "negative", "error", "message"),
    [
        (None, "", TypeError, "a prompt must be a string, got NoneType"),
        (["a cat", b"a dog"], "", TypeError, "a prompt must be a string, got bytes"),
        ("a cat", 3, TypeError, "a negative prompt must be a string, got int"),
        ([], [], ValueError, "needs at least one prompt"),
        (["a", "b"], ["c"], ValueError, "got 2 prompts but 1 negative prompts"),
    ],
)
def test_prompts_that_are_not_text_are_refused(
    sd: StableDiffusion_1, text: Any, negative: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sd.compute_clip_text_embedding(text, negative_text=negative)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (torch.full((1, 4, 8, 8), float("nan")), "the latents has 256 NaN"),
        (
            torch.zeros(1, 4, 8, 8).index_fill_(2, torch.tensor([0]), float("inf")),
            "the latents has 0 NaN and 32 infinite values",
        ),
        (torch.full((1, 4, 8, 8), 3e38), r"the decoded images \(torch.float32\) has"),
    ],
)
def test_latents_that_decode_to_nan_are_refused_not_written_black(
    sd: StableDiffusion_1, latents: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=f"latents_to_images: {message}"):
        sd.lda.latents_to_image(latents)


def test_16_bit_and_float_init_images_are_read_by_meaning(sd: StableDiffusion_1) -> None:
    """A 16-bit white image is white (not clipped), a float image in [0, 1] is scaled (not black)."""
    white = sd.lda.image_to_latents(Image.new("RGB", (64, 64), (255, 255, 255)))
    grey = sd.lda.image_to_latents(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert not torch.allclose(white, grey)  # the comparison below can tell images apart
    sixteen_bit = Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16))
    assert sixteen_bit.mode.startswith("I;16")
    assert torch.allclose(sd.lda.image_to_latents(sixteen_bit), white)
    as_float = Image.fromarray(np.full((64, 64), 128 / 255, dtype=np.float32))
    assert torch.allclose(sd.lda.image_to_latents(as_float), grey, atol=1e-5)
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        sd.lda.image_to_latents(Image.fromarray(np.full((64, 64), np.nan, dtype=np.float32)))


def painted_left_half(mode: str) -> Image.Image:
    """A 64x64 mask whose left half is to be repainted, drawn as a user of this mode would."""
    if mode == "RGBA":  # red paint on a transparent white layer
        image = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
        image.paste((255, 0, 0, 255), (0, 0, 32, 64))
        return image
    if mode == "LA":  # black paint on a transparent layer: the alpha says what is painted
        image = Image.new("LA", (64, 64), (255, 0))
        image.paste((0, 255), (0, 0, 32, 64))
        return image
    if mode == "I;16":
        pixels = np.zeros((64, 64), dtype=np.uint16)
        pixels[:, :32] = 65535
        return Image.fromarray(pixels)
    if mode == "F":
        pixels = np.zeros((64, 64), dtype=np.float32)
        pixels[:, :32] = 1.0
        return Image.fromarray(pixels)
    image = Image.new(mode, (64, 64), 0)
    image.paste(255 if mode in ("L", "1") else (255, 255, 255), (0, 0, 32, 64))
    return image


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "LA", "I;16", "F"])
def test_inpainting_masks_are_read_by_meaning(inpainting: StableDiffusion_1_Inpainting, mode: str) -> None:
    mask, _ = inpainting.set_inpainting_conditions(Image.new("RGB", (64, 64), (10, 200, 30)), painted_left_half(mode))
    assert mask.shape == (1, 1, 8, 8)
    assert mask[..., :4].eq(1).all() and mask[..., 4:].eq(0).all(), mask


@pytest.mark.parametrize(
    ("image", "mask", "error", "message"),
    [
        (Image.new("RGB", (64, 64)), Image.new("L", (8, 9000)), ValueError, "mask is 8x9000 .*from 1 to 8192"),
        (Image.new("RGB", (64, 64)), Image.new("L", (0, 0)), ValueError, "mask is 0x0"),
        (Image.new("RGB", (8200, 64)), Image.new("L", (64, 64)), ValueError, "target image is 8200x64"),
        (Image.new("RGB", (60, 64)), Image.new("L", (64, 64)), ValueError, "positive multiple of 8"),
        (Image.new("RGB", (64, 64)), torch.ones(64, 64), TypeError, "mask must be a PIL.Image.Image, got Tensor"),
        (Image.new("RGB", (64, 64)), Image.fromarray(np.full((64, 64), np.inf, np.float32)), ValueError, "infinite"),
    ],
)
def test_inpainting_refuses_images_and_masks_out_of_bounds(
    inpainting: StableDiffusion_1_Inpainting, image: Any, mask: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        inpainting.set_inpainting_conditions(image, mask)
