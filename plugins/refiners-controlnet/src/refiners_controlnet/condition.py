"""Conditioning images: from a PIL image to the tensor a ControlNet takes."""

from __future__ import annotations

import torch
from PIL import Image


def image_to_condition(image: Image.Image) -> torch.Tensor:
    """An image as a float32 `(1, 3, H, W)` conditioning tensor in [0, 1] (converted to RGB first), as diffusers'
    ControlNet pipelines prepare it. It is not resized here: the ControlNet resizes it to the generated size."""
    rgb = image.convert("RGB")
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return pixels.permute(2, 0, 1).unsqueeze(0).float().div_(255)
