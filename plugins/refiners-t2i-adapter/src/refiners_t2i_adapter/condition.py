"""Condition images: from a PIL image to the tensor a T2I-Adapter reads, as diffusers' adapter pipelines make it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from refiners_core.images import to_rgb


def condition_image(image: Image.Image, in_channels: int) -> Image.Image:
    """`image` as the 8-bit image an adapter with `in_channels` reads: RGB for 3 (`refiners_core.images.to_rgb`:
    16-bit and float images scaled, alpha dropped), grayscale (`L`) for 1.

    A grayscale adapter (canny, sketch...) reads an edge map: an image whose colour channels are equal (a grey
    image stored as RGB) is read as grey, but a colour image is refused rather than silently turned into luma.
    Raises TypeError for what is not a PIL image, ValueError naming the mode for a colour image given to a
    grayscale adapter, and for an adapter that reads neither 1 nor 3 channels (give it a tensor).
    """
    if in_channels not in (1, 3):
        raise ValueError(
            f"this T2I-Adapter reads {in_channels} channels (in_channels={in_channels}), which no PIL image mode "
            f"gives: pass a (1, {in_channels}, H, W) tensor in [0, 1]"
        )
    rgb = to_rgb(image)
    if in_channels == 3:
        return rgb
    if image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;16"):
        return rgb.convert("L")
    pixels = np.asarray(rgb)
    if not ((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()):
        raise ValueError(
            f"this T2I-Adapter reads grayscale images (in_channels=1) but the {image.mode} condition image has "
            "colours: pass the edge map or sketch itself (image.convert('L') if its luma is what you want)"
        )
    return rgb.convert("L")
