"""What `SegmentAnything` does with every kind of input: images of any mode read by meaning, and bad images, points,
boxes and mask prompts refused with a one-line TypeError or ValueError naming the argument, before any work.

The model is the tiny checkpoint of test_sam_model.py (128x128 inputs, so an image may be at most 256 times longer
than wide); the image is 120x90, so points must lie in [0, 120] x [0, 90].
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from PIL import Image
from sam_reference import build_tiny_reference

from refiners_sam import MAX_IMAGE_PIXELS, ImageEmbedding, SegmentAnything
from refiners_sam.inputs import check_image

WIDTH, HEIGHT = 120, 90
ARGUMENTS = ("foreground_points", "background_points", "box_points")


@pytest.fixture(scope="module")
def sam(tmp_path_factory: pytest.TempPathFactory) -> SegmentAnything:
    path = tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth"
    torch.save(build_tiny_reference(seed=3).state_dict(), path)
    return SegmentAnything.from_pretrained(path)


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """An 8-bit grayscale image with every value from 0 to 255 (a gradient plus noise)."""
    generator = np.random.default_rng(5)
    gradient = np.linspace(0, 255, WIDTH)[None, :] + generator.normal(0, 40, (HEIGHT, WIDTH))
    pixels = np.clip(np.rint(gradient), 0, 255).astype(np.uint8)
    pixels[0, :2] = (0, 255)
    return pixels


@pytest.fixture(scope="module")
def image() -> Image.Image:
    generator = torch.Generator().manual_seed(7)
    return Image.fromarray((torch.rand(HEIGHT, WIDTH, 3, generator=generator) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def embedding(sam: SegmentAnything, image: Image.Image) -> ImageEmbedding:
    return sam.compute_image_embedding(image)


# Images: converted by meaning.


@pytest.mark.parametrize(
    "widen, pil_clips",
    [
        (lambda pixels: Image.fromarray(pixels.astype(np.uint16) * 257), True),  # I;16, 65535 is white
        (lambda pixels: Image.frombytes("I;16B", (WIDTH, HEIGHT), (pixels.astype(">u2") * 257).tobytes()), True),
        (lambda pixels: Image.fromarray(pixels.astype(np.float32) / 255), True),  # F in [0, 1]
        (lambda pixels: Image.fromarray(pixels.astype(np.int32) * 257), True),  # I holding 16-bit values
        (lambda pixels: Image.fromarray(pixels.astype(np.float32)), False),  # F in [0, 255]
        (lambda pixels: Image.fromarray(pixels).convert("LA"), False),  # opaque alpha, dropped
    ],
    ids=["I;16", "I;16B", "F-unit", "I-16-bit", "F-255", "LA"],
)
def test_sam_reads_16_bit_and_float_images_as_the_8_bit_image_they_hold(
    sam: SegmentAnything, gray: np.ndarray, widen: Any, pil_clips: bool
) -> None:
    eight_bit = Image.fromarray(gray)
    wide = widen(gray)
    expected = sam.compute_image_embedding(eight_bit)
    if pil_clips:  # the comparison means something: PIL's own conversion makes these all white or all black
        naive = sam.compute_image_embedding(wide.convert("RGB"))
        assert not torch.allclose(naive.features, expected.features, atol=1e-3)
    ours = sam.compute_image_embedding(wide)
    assert torch.allclose(ours.features, expected.features, rtol=0, atol=1e-6)
    prompt = {"foreground_points": [(60.0, 45.0)], "box_points": [[(20.0, 10.0), (100.0, 80.0)]]}
    masks, scores, _ = sam.predict(wide, **prompt)
    expected_masks, expected_scores, _ = sam.predict(eight_bit, **prompt)
    assert 0.0 < expected_masks.float().mean() < 1.0
    assert torch.equal(masks, expected_masks) and torch.allclose(scores, expected_scores, rtol=0, atol=1e-6)


def test_sam_drops_the_alpha_channel_of_an_rgba_image(sam: SegmentAnything, image: Image.Image) -> None:
    rgba = image.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(WIDTH, dtype=np.uint8), (HEIGHT, 1))))
    assert torch.equal(sam.compute_image_embedding(rgba).features, sam.compute_image_embedding(image).features)


def test_sam_refuses_a_float_image_with_nan_pixels(sam: SegmentAnything) -> None:
    pixels = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    pixels[3, 4] = np.nan
    with pytest.raises(ValueError, match="^image: F image has NaN or infinite pixels"):
        sam.compute_image_embedding(Image.fromarray(pixels))


# Images: refused by size, before they are decoded.


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_sam_refuses_an_image_without_pixels(sam: SegmentAnything, size: tuple[int, int]) -> None:
    for call in (
        lambda: sam.compute_image_embedding(Image.new("RGB", size)),
        lambda: sam.predict(Image.new("L", size)),
    ):
        with pytest.raises(ValueError, match=rf"^image: {size[0]}x{size[1]} \(width x height\) has no pixels$"):
            call()


@pytest.mark.parametrize("size", [(1, 257), (257, 1), (2, 600), (1, 5000)])
def test_sam_refuses_an_image_whose_short_side_would_vanish(sam: SegmentAnything, size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=r"^image: .* is too elongated: .* at most 256 times the short one$"):
        sam.compute_image_embedding(Image.new("RGB", size))


@pytest.mark.parametrize("size", [(1, 256), (256, 1), (3, 700)])
def test_sam_encodes_an_elongated_image_whose_short_side_stays(sam: SegmentAnything, size: tuple[int, int]) -> None:
    masks, _, _ = sam.predict(Image.new("RGB", size, (200, 10, 10)), foreground_points=[(0.5, 0.5)])
    assert masks.shape[-2:] == (size[1], size[0])


def test_check_image_bounds_the_aspect_ratio_of_the_published_models_at_2048() -> None:
    assert check_image(Image.new("L", (1, 2048)), 1024).size == (1, 2048)
    with pytest.raises(ValueError, match=r"image: 1x5000 \(width x height\) is too elongated"):
        check_image(Image.new("L", (1, 5000)), 1024)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` grey pixels and holds a few bytes of them: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 64)))
    return path


@pytest.mark.parametrize("size", [(10_001, 10_000), (13_000, 13_000)])
def test_sam_refuses_a_giant_image_before_decoding_it(
    sam: SegmentAnything, tmp_path: Path, size: tuple[int, int]
) -> None:
    assert size[0] * size[1] > MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        giant = Image.open(_png_header_only(tmp_path / "giant.png", *size))
    for call in (lambda: sam.compute_image_embedding(giant), lambda: sam.predict(giant, foreground_points=[(1, 1)])):
        with pytest.raises(ValueError, match=r"^image: .* megapixels, SAM takes at most 100; .* downscale it first$"):
            call()


@pytest.mark.parametrize(
    "not_an_image", [np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8), "dog.jpg", None, torch.zeros(3)]
)
def test_sam_refuses_what_is_not_an_image(sam: SegmentAnything, not_an_image: object) -> None:
    with pytest.raises(TypeError, match=r"^image must be a PIL\.Image\.Image, got "):
        sam.compute_image_embedding(not_an_image)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^image must be a PIL\.Image\.Image or an ImageEmbedding, got "):
        sam.predict(not_an_image, foreground_points=[(1, 1)])  # type: ignore[arg-type]


# Points and boxes: every well-formed spelling accepted, everything else refused naming the item.


@pytest.mark.parametrize(
    "prompt",
    [
        {"foreground_points": [[30, 40]], "background_points": ([100.5, 70],)},
        {"foreground_points": np.array([[30, 40]]), "background_points": np.array([[100.5, 70.0]], dtype=np.float32)},
        {"foreground_points": torch.tensor([[30, 40]]), "background_points": torch.tensor([[100.5, 70.0]])},
        {"foreground_points": [(np.int64(30), np.float32(40))], "background_points": [(torch.tensor(100.5), 70)]},
        {"foreground_points": [np.array([30, 40])], "background_points": [torch.tensor([100.5, 70.0])]},
    ],
    ids=["lists", "numpy", "tensors", "scalars", "rows"],
)
def test_sam_predict_takes_points_as_pairs_arrays_or_tensors(
    sam: SegmentAnything, embedding: ImageEmbedding, prompt: dict[str, Any]
) -> None:
    expected = sam.predict(embedding, foreground_points=[(30.0, 40.0)], background_points=[(100.5, 70.0)])
    for ours, reference in zip(sam.predict(embedding, **prompt), expected):
        assert torch.equal(ours, reference)


@pytest.mark.parametrize(
    "boxes",
    [[[[10, 15], [80, 60]]], np.array([[[10, 15], [80, 60]]]), torch.tensor([[[10.0, 15.0], [80.0, 60.0]]])],
    ids=["lists", "numpy", "tensor"],
)
def test_sam_predict_takes_boxes_as_pairs_arrays_or_tensors(
    sam: SegmentAnything, embedding: ImageEmbedding, boxes: Any
) -> None:
    expected = sam.predict(embedding, box_points=[[(10.0, 15.0), (80.0, 60.0)]])
    for ours, reference in zip(sam.predict(embedding, box_points=boxes), expected):
        assert torch.equal(ours, reference)


def test_sam_predict_takes_points_on_the_image_edges(sam: SegmentAnything, embedding: ImageEmbedding) -> None:
    masks, _, _ = sam.predict(
        embedding,
        foreground_points=[(0, 0), (WIDTH, HEIGHT)],
        background_points=[(WIDTH, 0)],
        box_points=[[(0, 0), (WIDTH, HEIGHT)], [(5, 5), (5, 5)]],
    )
    assert masks.shape == (1, 3, HEIGHT, WIDTH)


@pytest.mark.parametrize(
    "argument, value, error, message",
    [
        ("foreground_points", "12", TypeError, r"foreground_points must be a list of \(x, y\) points, got str"),
        ("foreground_points", 5, TypeError, "foreground_points must be a list of .*, got int"),
        ("foreground_points", {1: 2}, TypeError, "foreground_points must be a list of .*, got dict"),
        ("foreground_points", (500, 37), TypeError, r"foreground_points\[0\] .* write foreground_points=\[\(x, y\)\]"),
        ("background_points", [(1, 2, 3)], ValueError, r"background_points\[0\] must be an \(x, y\) point, got 3"),
        ("background_points", [(1,)], ValueError, r"background_points\[0\] must be an \(x, y\) point, got 1 values"),
        ("foreground_points", [(1, 2), None], TypeError, r"foreground_points\[1\] must be an \(x, y\) point, got None"),
        ("foreground_points", [[(1, 2), (3, 4)]], TypeError, r"foreground_points\[0\]: x must be a number, got tuple"),
        ("foreground_points", [("1", 2)], TypeError, r"foreground_points\[0\]: x must be a number, got str '1'"),
        ("foreground_points", ["ab"], TypeError, r"foreground_points\[0\] must be an \(x, y\) point, got str"),
        ("foreground_points", [(3, True)], TypeError, r"foreground_points\[0\]: y must be a number, got bool"),
        ("foreground_points", [(3, 1j)], TypeError, r"foreground_points\[0\]: y must be a number, got complex"),
        ("foreground_points", [(math.nan, 2)], ValueError, r"foreground_points\[0\]: x must be a finite number"),
        ("background_points", [(1, 1), (2, -math.inf)], ValueError, r"background_points\[1\]: y must be a finite"),
        ("foreground_points", [(10**400, 2)], ValueError, r"foreground_points\[0\]: x must be a finite number"),
        ("foreground_points", [(1, 2), (121, 5)], ValueError, r"foreground_points\[1\]: \(121, 5\) is outside"),
        ("foreground_points", [(-0.5, 5)], ValueError, r"foreground_points\[0\]: .* outside the 120x90 image"),
        ("background_points", [(5, 100)], ValueError, r"background_points\[0\]: .* 0 <= y <= 90"),
        ("foreground_points", np.zeros((3, 3)), ValueError, r"foreground_points must be .* shape \(N, 2\), got"),
        ("foreground_points", np.array([1.0, 2.0]), ValueError, r"foreground_points .* \(N, 2\), got shape \(2,\)"),
        ("foreground_points", np.array([["a", "b"]]), TypeError, "foreground_points must be .* got an array of <U1"),
        (
            "foreground_points",
            torch.ones(2, 2, dtype=torch.bool),
            TypeError,
            "foreground_points must .* got an array of torch.bool",
        ),
        ("foreground_points", torch.zeros(1, 2, device="meta"), TypeError, "foreground_points .* got a meta tensor"),
        ("background_points", [(torch.tensor(1.0).to_sparse(), 2)], TypeError, r"background_points\[0\]: x .* sparse"),
        ("foreground_points", [np.zeros(3)], ValueError, r"foreground_points\[0\] .* shape \(2,\), got shape \(3,\)"),
        ("foreground_points", [(1, 2)] * 1025, ValueError, "foreground_points holds 1025 items, at most 1024"),
        ("foreground_points", np.ones((2000, 2)), ValueError, "foreground_points holds 2000 items, at most 1024"),
        ("box_points", "box", TypeError, "box_points must be a list of boxes"),
        ("box_points", [(75, 27), (100, 85)], ValueError, r"box_points\[0\]: a box is two points .* got \(75, 27\)"),
        ("box_points", [[1, 2, 3, 4]], ValueError, r"box_points\[0\]: a box is two points .* got 4 numbers"),
        ("box_points", [[(1, 1), (5, 5), (9, 9)]], ValueError, r"box_points\[0\]: a box is two points"),
        ("box_points", [None], TypeError, r"box_points\[0\] must be a box \[\(x1, y1\), \(x2, y2\)\], got None"),
        ("box_points", [[(80, 60), (10, 15)]], ValueError, r"box_points\[0\]: the top left corner \(80, 60\) must"),
        ("box_points", [[(1, 1), (2, 2)], [(1, 2), (3, math.nan)]], ValueError, r"box_points\[1\]\[1\]: y must be"),
        ("box_points", [[(1, 2), (300, 4)]], ValueError, r"box_points\[0\]\[1\]: \(300, 4\) is outside"),
        ("box_points", np.zeros((1, 4)), ValueError, r"box_points must be .* shape \(N, 2, 2\), got shape \(1, 4\)"),
        ("box_points", [[(1, 1), (2, 2)]] * 513, ValueError, "foreground_points, .* hold 1026 points .* at most 1024"),
    ],
)
def test_sam_predict_refuses_malformed_points_and_boxes_naming_the_item(
    sam: SegmentAnything,
    image: Image.Image,
    embedding: ImageEmbedding,
    monkeypatch: pytest.MonkeyPatch,
    argument: str,
    value: object,
    error: type[Exception],
    message: str,
) -> None:
    def encode(image: Image.Image) -> ImageEmbedding:
        raise AssertionError("the image was encoded before the prompt was checked")

    monkeypatch.setattr(sam, "compute_image_embedding", encode)
    for source in (image, embedding):
        with pytest.raises(error, match=f"^{message}") as raised:
            sam.predict(source, **{argument: value})  # type: ignore[arg-type]
        assert "\n" not in str(raised.value) and len(str(raised.value)) < 300


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (np.zeros((1, 1, 32, 32), dtype=np.float32), TypeError, "low_res_mask must be a torch.Tensor .* got ndarray"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.bool), TypeError, "low_res_mask must hold float .* got torch.bool"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.int64), TypeError, "low_res_mask must hold float .* got torch.int64"),
        (torch.zeros(1, 32, 32), ValueError, r"low_res_mask must have shape \(1, 1, 32, 32\), got \(1, 32, 32\)"),
        (torch.zeros(1, 1, 256, 256), ValueError, r"low_res_mask must have shape \(1, 1, 32, 32\)"),
        (
            torch.zeros(1, 1, 32, 32).index_fill_(2, torch.tensor([3]), math.nan),
            ValueError,
            "low_res_mask has 32 NaN or infinite",
        ),
        (torch.full((1, 1, 32, 32), -math.inf), ValueError, "low_res_mask has 1024 NaN or infinite values"),
    ],
    ids=["numpy", "bool", "int", "3d", "256", "nan", "inf"],
)
def test_sam_predict_refuses_a_bad_low_res_mask(
    sam: SegmentAnything, embedding: ImageEmbedding, mask: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{message}"):
        sam.predict(embedding, foreground_points=[(1, 1)], low_res_mask=mask)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_sam_predict_refuses_a_multimask_output_that_is_not_a_bool(
    sam: SegmentAnything, embedding: ImageEmbedding, flag: object
) -> None:
    with pytest.raises(TypeError, match="^multimask_output must be a bool, got "):
        sam.predict(embedding, foreground_points=[(1, 1)], multimask_output=flag)  # type: ignore[arg-type]


# Properties over the prompt arguments.

PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=100,
    deadline=5000,  # ms: a prompt is checked in microseconds and decoded in a fraction of a second; not a hang
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)


def _coordinate(limit: int) -> st.SearchStrategy[float]:
    return st.one_of(st.integers(0, limit), st.floats(0, limit, allow_nan=False))


def _points() -> st.SearchStrategy[list[tuple[float, float]]]:
    return st.lists(st.tuples(_coordinate(WIDTH), _coordinate(HEIGHT)), max_size=4)


@st.composite
def _boxes(draw: st.DrawFn) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    boxes: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for _ in range(draw(st.integers(0, 2))):
        x1, x2 = sorted((draw(_coordinate(WIDTH)), draw(_coordinate(WIDTH))))
        y1, y2 = sorted((draw(_coordinate(HEIGHT)), draw(_coordinate(HEIGHT))))
        boxes.append(((x1, y1), (x2, y2)))
    return boxes


def _spelled(value: list[Any], shape: tuple[int, ...], spelling: str) -> Any:
    """`value` as a list of lists, a tuple, a numpy array or a tensor (arrays reshaped to `shape`)."""
    if spelling == "numpy":
        return np.array(value, dtype=np.float64).reshape(shape)
    if spelling == "tensor":
        return torch.tensor(value, dtype=torch.float32).reshape(shape)
    if spelling == "lists":
        return [[list(item) for item in entry] if isinstance(entry[0], tuple) else list(entry) for entry in value]
    return tuple(value)


@hypothesis.settings(PROPERTY_SETTINGS, max_examples=25)  # each example runs the mask decoder
@hypothesis.given(
    foreground=_points(),
    background=_points(),
    boxes=_boxes(),
    spelling=st.sampled_from(["tuples", "lists", "numpy", "tensor"]),
    none_when_empty=st.booleans(),
)
def test_property_sam_predict_takes_every_well_formed_prompt(
    sam: SegmentAnything,
    embedding: ImageEmbedding,
    foreground: list[tuple[float, float]],
    background: list[tuple[float, float]],
    boxes: list[Any],
    spelling: str,
    none_when_empty: bool,
) -> None:
    def spell(value: list[Any], shape: tuple[int, ...]) -> Any:
        return None if none_when_empty and not value else _spelled(value, shape, spelling)

    masks, scores, logits = sam.predict(
        embedding,
        foreground_points=spell(foreground, (-1, 2)),
        background_points=spell(background, (-1, 2)),
        box_points=spell(boxes, (-1, 2, 2)),
        multimask_output=False,
    )
    assert masks.shape == (1, 1, HEIGHT, WIDTH) and scores.shape == (1, 1) and logits.shape == (1, 1, 32, 32)
    assert torch.isfinite(scores).all() and torch.isfinite(logits).all()


BAD_COORDINATES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1e-3, 1e9, True, False, None, "1", b"1", 1j, (1,), [], 10**400]),
    st.floats(max_value=-1e-6, allow_nan=False),
    st.floats(min_value=WIDTH + 1e-3),
    st.text(max_size=3),
)


@PROPERTY_SETTINGS
@hypothesis.given(
    foreground=_points(),
    background=_points(),
    boxes=_boxes(),
    target=st.sampled_from(ARGUMENTS),
    data=st.data(),
)
def test_property_sam_predict_refuses_a_prompt_with_one_bad_value_naming_its_item(
    sam: SegmentAnything,
    embedding: ImageEmbedding,
    foreground: list[tuple[float, float]],
    background: list[tuple[float, float]],
    boxes: list[Any],
    target: str,
    data: st.DataObject,
) -> None:
    prompt: dict[str, list[Any]] = {"foreground_points": foreground, "background_points": background}
    prompt["box_points"] = boxes
    items = list(prompt[target]) or [((1.0, 1.0), (2.0, 2.0)) if target == "box_points" else (1.0, 1.0)]
    index = data.draw(st.integers(0, len(items) - 1))
    corruption = data.draw(st.sampled_from(["coordinate", "arity", "item"]))
    item = items[index]
    if target == "box_points":
        corner = data.draw(st.integers(0, 1))
        where = rf"box_points\[{index}\](\[{corner}\])?"
        if corruption == "item":  # the check names the first bad corner of a bad box, whichever `corner` is
            where = rf"box_points\[{index}\](\[[01]\])?"
            bad: Any = data.draw(st.sampled_from([None, "box", 3.5, [item[0]], [*item, item[0]], [(1, 2, 3), (4, 5)]]))
        else:
            point = _corrupt_point(item[corner], corruption, data)
            bad = (point, item[1]) if corner == 0 else (item[0], point)
    else:
        where = rf"{target}\[{index}\]"
        bad = _corrupt_point(item, corruption, data) if corruption != "item" else data.draw(BAD_COORDINATES)
    items[index] = bad
    prompt[target] = items
    with pytest.raises((TypeError, ValueError), match=f"^{where}[ :]"):
        sam.predict(embedding, **prompt)  # type: ignore[arg-type]


def _corrupt_point(point: tuple[float, float], corruption: str, data: st.DataObject) -> Any:
    if corruption == "arity":
        return data.draw(st.sampled_from([(), (point[0],), (*point, 1.0), [*point, 1.0, 2.0]]))
    axis = data.draw(st.integers(0, 1))
    bad = data.draw(BAD_COORDINATES)
    return (bad, point[1]) if axis == 0 else (point[0], bad)


JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(),
        st.text(max_size=4),
        st.binary(max_size=4),
        st.complex_numbers(),
        st.builds(np.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple)),
        st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=2), children, max_size=2),
    ),
    max_leaves=12,
)


@PROPERTY_SETTINGS
@hypothesis.given(foreground=JUNK, background=JUNK, boxes=JUNK)
def test_property_sam_predict_answers_any_prompt_with_masks_or_an_error_naming_an_argument(
    sam: SegmentAnything, embedding: ImageEmbedding, foreground: object, background: object, boxes: object
) -> None:
    try:
        masks, _, _ = sam.predict(
            embedding,
            foreground_points=foreground,  # type: ignore[arg-type]
            background_points=background,  # type: ignore[arg-type]
            box_points=boxes,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as error:
        message = str(error)
        assert message.startswith(ARGUMENTS) and "\n" not in message, message
    else:
        assert masks.shape == (1, 3, HEIGHT, WIDTH)
