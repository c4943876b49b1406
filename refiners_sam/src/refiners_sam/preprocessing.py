"""Images in and masks out, as Segment Anything's predictor does it.

An image is resized so that its longest side is the encoder's input size (1024), the other side rounded to the
nearest pixel, with PIL's bilinear resampling; it is then normalised with SAM's pixel mean and standard deviation
and padded with zeros on the right and bottom to a square. Masks go the other way: upsampled (bilinear) to the
padded square, cropped to the resized image, upsampled again to the image's own size.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch.nn import functional as F

from refiners_core.images import to_rgb

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """`(height, width)` scaled so that the longest side is `long_side`, each rounded to the nearest integer."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def image_to_input(
    image: Image.Image, image_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The encoder's input `(1, 3, image_size, image_size)` for a PIL image, and the size the image was resized to.

    The image is first made 8-bit RGB by what its pixels mean (`refiners_core.images.to_rgb`).
    """
    rgb = to_rgb(image)
    height, width = resized_size(rgb.height, rgb.width, image_size)
    resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(height, width, 3)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    normalized = (pixels.permute(2, 0, 1).float() - mean) / std
    padded = F.pad(normalized, (0, image_size - width, 0, image_size - height))
    return padded[None].to(device=device, dtype=dtype), (height, width)


def logits_to_image_size(
    logits: torch.Tensor, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Low-resolution mask logits `(B, M, h, w)` to `(B, M, H, W)` at the image's own size `original_size`."""
    padded = F.interpolate(logits, (image_size, image_size), mode="bilinear", align_corners=False)
    cropped = padded[..., : input_size[0], : input_size[1]]
    return F.interpolate(cropped, original_size, mode="bilinear", align_corners=False)
