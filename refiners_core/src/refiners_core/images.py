"""PIL images to what models read, by what their pixels mean: 8-bit RGB images and 8-bit masks.

`Image.convert("RGB")` clips every mode to 8 bits by value, so a 16-bit image (`I;16`, 0 to 65535) comes out all
white and a float image (`F`, 0.0 to 1.0) all black. `to_rgb` and `to_mask` scale such pixels by their range first.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, whatever its mode, with the pixels' meaning kept.

    - `I;16` (and `I;16B`, `I;16L`, `I;16N`): the full 16-bit range, 65535 is white (each value divided by 257).
    - `I` (32-bit integers) and `F` (floats): scaled by the range the values lie in: `F` images within [0, 1] are
      multiplied by 255; `I` and `F` images within [0, 255] are taken as they are; `I` and `F` images within
      [0, 65535] are divided by 257; anything else is stretched from its own [min, max] to [0, 255] (a constant
      image is then black).
    - Images with an alpha channel (`RGBA`, `LA`, `PA`, `P` with a transparent colour, premultiplied `RGBa`, `La`):
      the alpha channel is dropped and the colours are kept as stored, as PIL's `convert("RGB")`, diffusers'
      `load_image` and OpenCV's `imread` do; composite over a background first (`Image.alpha_composite`) for
      another result.
    - Every other mode (`L`, `1`, `P`, `CMYK`, `YCbCr`, `LAB`, `HSV`, `RGBX`) goes through PIL's `convert("RGB")`.

    Raises TypeError when `image` is not a PIL image, ValueError for an `F` image with NaN or infinite pixels.
    """
    _check_is_image(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _scaled_to_8_bits(image).convert("RGB")
    return _with_straight_alpha(image).convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """An 8-bit mask (`L`) read from `image`: 255 where it is masked (to inpaint), 0 where it is kept.

    The rule is the one of AUTOMATIC1111's web UI for uploaded masks, without its rounding: when the image has an
    alpha channel (`RGBA`, `LA`, `PA`, `P` with a transparent colour, `RGBa`, `La`) that is not opaque everywhere,
    the mask is that alpha channel, whatever the colours: a mask painted with any colour on a transparent layer
    masks what is painted. Otherwise the mask is the image's brightness: white is masked, black is kept, grey is
    in between (`I;16`, `I` and `F` images scaled as `to_rgb` does, colour images by ITU-R 601 luma).

    An image with a hole cut where it should be repainted (ComfyUI's `LoadImage` reads masked = 1 - alpha) is not
    a mask in this sense: pass `ImageOps.invert(image.getchannel("A"))` for it. The mask keeps soft edges; threshold
    it if a binary mask is wanted. Raises TypeError when `image` is not a PIL image, ValueError for an `F` image
    with NaN or infinite pixels.
    """
    _check_is_image(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _scaled_to_8_bits(image)
    image = _with_straight_alpha(image)
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L") if image.mode in ("1", "L", "LA", "RGB", "RGBA") else to_rgb(image).convert("L")


def _check_is_image(image: object) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")


def _with_straight_alpha(image: Image.Image) -> Image.Image:
    """Premultiplied `La`, `RGBa` and a `P` image with a transparent colour in a mode with an `A` band.

    PIL converts `La` and `RGBa` to `LA` and `RGBA` only, and warns when a `P` image with transparency is converted
    to anything but `RGBA`.
    """
    if image.mode == "P" and image.has_transparency_data:
        return image.convert("RGBA")
    straight = _PREMULTIPLIED.get(image.mode)
    return image.convert(straight) if straight is not None else image


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """An `L` image from a 16-bit, 32-bit integer or float one, scaled by the range described in `to_rgb`."""
    values = np.asarray(image).astype(np.float32)
    if image.mode in SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        if not np.isfinite(values).all():
            raise ValueError(f"image: {image.mode} image has NaN or infinite pixels")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        elif low >= 0.0 and high <= 255.0:
            low, high = 0.0, 255.0
        elif low >= 0.0 and high <= 65535.0:
            low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    pixels = np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
