"""Conditioning images: from a PIL image to the tensor a ControlNet takes."""

from __future__ import annotations

import torch
from PIL import Image

from refiners_core.images import to_rgb


def image_to_condition(image: Image.Image) -> torch.Tensor:
    """An image as a float32 `(1, 3, H, W)` conditioning tensor in [0, 1], as diffusers' ControlNet pipelines
    prepare it, after `refiners_core.images.to_rgb` (16-bit and float images scaled, not clipped). It is not resized
    here: the ControlNet resizes it to the generated size."""
    rgb = to_rgb(image)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).unsqueeze(0).float().div_(255)
