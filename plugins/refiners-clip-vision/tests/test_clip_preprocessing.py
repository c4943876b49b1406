"""`preprocess_images` against transformers' `CLIPImageProcessor` (with torchvision absent, its PIL backend, as
diffusers' IP-Adapter pipelines create it): within 1e-4 of max |reference| for images of several sizes and modes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_clip_vision import preprocess_images


def reference(images: list[Image.Image], size: int) -> torch.Tensor:
    from transformers import CLIPImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = CLIPImageProcessorPil(size=size, crop_size=size)
    return processor(images, return_tensors="pt").pixel_values


def noise_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


@pytest.mark.parametrize(
    "width, height, mode",
    [(400, 300, "RGB"), (225, 500, "L"), (224, 224, "RGB"), (101, 150, "RGBA"), (640, 481, "P")],
)
def test_preprocessing_matches_transformers_clip_image_processor(width: int, height: int, mode: str) -> None:
    images = [noise_image(width, height, mode, seed) for seed in range(2)]
    expected = reference(images, 224)
    ours = preprocess_images(images)
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_preprocessing_at_another_size_matches_transformers() -> None:
    images = [noise_image(90, 70, "RGB", 0)]
    assert (preprocess_images(images, size=56) - reference(images, 56)).abs().max() <= 1e-4 * 2


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([], ValueError, "no images"),
        (["ref.png"], TypeError, r"images\[0\]: image must be a PIL.Image.Image, got str"),
        ([Image.new("RGB", (4, 4)), Image.new("RGB", (0, 5))], ValueError, r"images\[1\]: the image is 0x5"),
        (
            [Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), "F")],
            ValueError,
            r"images\[0\]: image: F image has NaN",
        ),
    ],
)
def test_unusable_images_are_refused_naming_them(images: list[Image.Image], error: type[Exception], message: str):
    with pytest.raises(error, match=message):
        preprocess_images(images)
