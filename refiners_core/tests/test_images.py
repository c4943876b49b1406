"""`to_rgb` and `to_mask`: every PIL mode read by what its pixels mean, checked against an 8-bit image of the same
content (exactly: the scalings are chosen so that an 8-bit image widened to 16 bits or to floats comes back as is)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from refiners_core.images import to_mask, to_rgb

GRAY = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _gray_rgb() -> np.ndarray:
    return _array(Image.fromarray(GRAY).convert("RGB"))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_to_rgb_reads_16_bit_images_over_the_full_16_bit_range(mode: str) -> None:
    wide = GRAY.astype(np.uint16) * 257  # 255 -> 65535: white in both
    wide[wide < 65535] += 100  # rounds back to the same 8-bit value, and makes the two bytes differ
    image = Image.frombytes(mode, (16, 16), wide.astype(">u2" if mode == "I;16B" else "=u2").tobytes())
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and np.array_equal(_array(rgb), _gray_rgb())


def test_to_rgb_rounds_16_bit_values_between_8_bit_steps_to_the_nearest() -> None:
    image = Image.fromarray(np.array([[0, 128, 129, 65535 - 129, 65535]], dtype=np.uint16))
    assert _array(to_rgb(image))[0, :, 0].tolist() == [0, 0, 1, 254, 255]


@pytest.mark.parametrize(
    "values, expected",
    [
        (GRAY.astype(np.float32) / 255, GRAY),  # [0, 1]: 1.0 is white
        (GRAY.astype(np.float32), GRAY),  # [0, 255]: as is
        (GRAY.astype(np.float32) * 257, GRAY),  # [0, 65535]: 16-bit values
        (GRAY.astype(np.float32) / 127.5 - 1, GRAY),  # [-1, 1]: stretched from min to max
        (np.full((4, 4), 0.5, dtype=np.float32), np.full((4, 4), 128, dtype=np.uint8)),
        (np.full((4, 4), -7.0, dtype=np.float32), np.zeros((4, 4), dtype=np.uint8)),  # constant, out of range
    ],
    ids=["unit", "8-bit", "16-bit", "signed", "half", "constant"],
)
def test_to_rgb_reads_float_images_by_their_range(values: np.ndarray, expected: np.ndarray) -> None:
    image = Image.fromarray(values)
    assert image.mode == "F"
    assert np.array_equal(_array(to_rgb(image))[..., 0], expected)


@pytest.mark.parametrize(
    "values",
    [GRAY.astype(np.int32), GRAY.astype(np.int32) * 257, GRAY.astype(np.int32) * 1000 - 100_000],
    ids=["8-bit", "16-bit", "stretched"],
)
def test_to_rgb_reads_32_bit_integer_images_by_their_range(values: np.ndarray) -> None:
    image = Image.fromarray(values)
    assert image.mode == "I"
    assert np.array_equal(_array(to_rgb(image)), _gray_rgb())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_to_rgb_refuses_float_images_with_non_finite_pixels(bad: float) -> None:
    values = np.zeros((4, 4), dtype=np.float32)
    values[1, 2] = bad
    with pytest.raises(ValueError, match="image: F image has NaN or infinite pixels"):
        to_rgb(Image.fromarray(values))


def _rgba() -> Image.Image:
    generator = np.random.default_rng(0)
    return Image.fromarray(generator.integers(0, 256, (8, 8, 4), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_to_rgb_drops_the_alpha_channel_and_keeps_the_stored_colours(mode: str) -> None:
    image = _rgba().convert(mode)
    expected = image.convert({"RGBa": "RGBA", "La": "LA"}.get(mode, mode)).convert("RGB")
    assert np.array_equal(_array(to_rgb(image)), _array(expected))


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8)).convert("P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.info["transparency"] = b"\x00\xff"  # colour 0 (red) fully transparent: a bytes table, which PIL warns about
    return image


def test_to_rgb_reads_a_palette_image_with_transparency_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = to_rgb(_palette_with_transparency())
    assert _array(rgb)[:, :, 0].tolist() == [[255, 0], [0, 255]]


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "HSV", "LAB", "RGBX", "RGB"])
def test_to_rgb_converts_every_other_mode_with_pil(mode: str) -> None:
    image = _rgba().convert("RGB").convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.array_equal(_array(rgb), _array(image.convert("RGB")))
    assert rgb is not image


@pytest.mark.parametrize("mode", ["RGB", "I;16", "F", "I"])
@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_to_rgb_keeps_zero_sized_images_zero_sized(mode: str, size: tuple[int, int]) -> None:
    assert to_rgb(Image.new(mode, size)).size == size


@pytest.mark.parametrize("not_an_image", [np.zeros((4, 4, 3), dtype=np.uint8), "dog.png", None, b"\x89PNG"])
def test_to_rgb_and_to_mask_refuse_what_is_not_a_pil_image(not_an_image: object) -> None:
    for convert in (to_rgb, to_mask):
        with pytest.raises(TypeError, match=r"image must be a PIL\.Image\.Image, got "):
            convert(not_an_image)  # type: ignore[arg-type]


def _strokes(colour: tuple[int, int, int], background: tuple[int, int, int]) -> tuple[Image.Image, np.ndarray]:
    """A mask drawn on a transparent layer: `colour` strokes (opaque, one soft pixel), `background` under alpha 0."""
    alpha = np.zeros((6, 6), dtype=np.uint8)
    alpha[1:3, 2:5] = 255
    alpha[4, 4] = 100
    pixels = np.empty((6, 6, 4), dtype=np.uint8)
    pixels[..., :3] = background
    pixels[alpha > 0, :3] = colour
    pixels[..., 3] = alpha
    return Image.fromarray(pixels), alpha


@pytest.mark.parametrize(
    "colour, background",
    [
        ((255, 255, 255), (255, 255, 255)),
        ((0, 0, 0), (0, 0, 0)),
        ((255, 0, 0), (0, 0, 0)),
        ((0, 0, 0), (255, 255, 255)),
    ],
    ids=["white-on-white", "black-on-black", "red-on-black", "black-on-white"],
)
@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa"])
def test_to_mask_reads_a_mask_drawn_on_a_transparent_layer_by_its_alpha(
    colour: tuple[int, int, int], background: tuple[int, int, int], mode: str
) -> None:
    image, alpha = _strokes(colour, background)
    mask = to_mask(image.convert(mode))
    assert mask.mode == "L"
    assert np.array_equal(_array(mask), alpha)


def test_to_mask_reads_a_palette_mask_with_a_transparent_colour_by_its_transparency() -> None:
    mask = to_mask(_palette_with_transparency())
    assert _array(mask).tolist() == [[0, 255], [255, 0]]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_to_mask_reads_an_opaque_image_with_alpha_by_its_brightness(mode: str) -> None:
    image = Image.fromarray(GRAY).convert(mode)
    assert np.array_equal(_array(to_mask(image)), GRAY)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(GRAY),
        Image.fromarray(GRAY).convert("RGB"),
        Image.fromarray(GRAY.astype(np.uint16) * 257),
        Image.fromarray(GRAY.astype(np.float32) / 255),
        Image.fromarray(GRAY.astype(np.int32)),
    ],
    ids=["L", "RGB", "I;16", "F", "I"],
)
def test_to_mask_reads_an_image_without_alpha_by_its_brightness(image: Image.Image) -> None:
    mask = to_mask(image)
    assert mask.mode == "L" and np.array_equal(_array(mask), GRAY)


def test_to_mask_reads_a_black_and_white_mask_and_colours_by_luma() -> None:
    binary = Image.fromarray(GRAY > 127)
    assert binary.mode == "1"
    assert np.array_equal(_array(to_mask(binary)), np.where(GRAY > 127, 255, 0))
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert _array(to_mask(red)).tolist() == [[76, 76], [76, 76]]  # 0.299 * 255


def test_to_mask_refuses_a_float_mask_with_nan() -> None:
    with pytest.raises(ValueError, match="image: F image has NaN or infinite pixels"):
        to_mask(Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32)))
