"""CLIP's image preprocessing: PIL images to the normalised `(N, 3, S, S)` tensor a `CLIPImageEncoder` reads, as
transformers' `CLIPImageProcessor` prepares them (resize the shortest side, bicubic; center crop; normalise)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from refiners_core.images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's per-channel mean of its training images, in [0, 1] (transformers' `OPENAI_CLIP_MEAN`)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel standard deviation (transformers' `OPENAI_CLIP_STD`)."""


def preprocess_image(image: Image.Image, size: int = 224) -> torch.Tensor:
    """One image as a float32 `(3, size, size)` tensor: 8-bit RGB (`refiners_core.images.to_rgb`; an image with
    transparency composited over white first, as transformers' `convert_to_rgb` does), the shortest side
    resized to `size` (bicubic, PIL; the other side `int(size * long / short)`), the center `size` square cropped
    (the extra pixels split with the odd one at the end), scaled to [0, 1] and normalised with `CLIP_MEAN` and
    `CLIP_STD`.

    Raises TypeError for something that is not a PIL image, ValueError for an image without pixels or an `F` image
    with NaN or infinite pixels.
    """
    rgb = to_rgb(_over_white(image))
    width, height = rgb.size
    if width == 0 or height == 0:
        raise ValueError(f"the image is {width}x{height}: it has no pixels")
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.BICUBIC)
    width, height = rgb.size
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.float64) * (1 / 255)
    tensor = torch.as_tensor(pixels.astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


def preprocess_images(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """Several images as one float32 `(N, 3, size, size)` batch (see `preprocess_image`).

    Raises ValueError for an empty sequence; TypeError or ValueError naming `images[i]` for an image that cannot
    be read (not a PIL image, no pixels, NaN pixels).
    """
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("no images to preprocess: give at least one PIL image")
    tensors: list[torch.Tensor] = []
    for index, image in enumerate(images):
        try:
            tensors.append(preprocess_image(image, size))
        except (TypeError, ValueError) as error:
            raise type(error)(f"images[{index}]: {error}") from None
    return torch.stack(tensors)


def _over_white(image: Image.Image) -> Image.Image:
    """`image` composited over a white background if it has an alpha channel or a transparent colour."""
    if not isinstance(image, Image.Image):  # pyright: ignore[reportUnnecessaryIsInstance]
        return image  # to_rgb names the type
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
