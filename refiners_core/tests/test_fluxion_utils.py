"""`refiners_core.fluxion.utils`: the helpers of Refiners 0.4's `refiners.fluxion.utils`, same signatures."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_core.fluxion.utils import (
    gaussian_blur,
    image_to_tensor,
    interpolate,
    manual_seed,
    no_grad,
    normalize,
    summarize_tensor,
    tensor_to_image,
)


def test_manual_seed_makes_draws_repeatable() -> None:
    manual_seed(7)
    first = torch.randn(4)
    manual_seed(7)
    assert torch.equal(torch.randn(4), first)
    manual_seed(8)
    assert not torch.equal(torch.randn(4), first)


def test_no_grad_works_as_a_context_manager_and_a_decorator() -> None:
    weight = torch.ones(2, requires_grad=True)
    with no_grad():
        assert not (weight * 2).requires_grad

    @no_grad()
    def doubled() -> torch.Tensor:
        return weight * 2

    assert not doubled().requires_grad
    assert (weight * 2).requires_grad


# images


def random_image(mode: str, size: tuple[int, int] = (5, 3)) -> Image.Image:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("RGBA", 4)])
def test_image_to_tensor_gives_a_batch_of_one_in_zero_one_with_the_mode_channels(mode: str, channels: int) -> None:
    image = random_image(mode)
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, channels, 3, 5) and tensor.dtype == torch.float32
    pixels = np.array(image).reshape(3, 5, channels)
    assert tensor[0, -1, 2, 4].item() == pytest.approx(pixels[2, 4, -1] / 255)
    assert 0.0 <= tensor.min().item() and tensor.max().item() <= 1.0
    assert image_to_tensor(image, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_tensor_to_image_gives_the_image_back(mode: str) -> None:
    image = random_image(mode)
    back = tensor_to_image(image_to_tensor(image))
    assert back.mode == mode
    assert np.array_equal(np.array(back), np.array(image))


def test_tensor_to_image_clamps_and_rounds() -> None:
    tensor = torch.tensor([[[[-0.5, 0.3, 2.0]]]])
    assert np.array(tensor_to_image(tensor)).tolist() == [[0, round(0.3 * 255), 255]]


def test_image_to_tensor_refuses_other_modes_naming_the_mode() -> None:
    with pytest.raises(ValueError, match="got a I;16 image"):
        image_to_tensor(Image.new("I;16", (2, 2)))


@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 3, 4, 4), (1, 2, 4, 4)])
def test_tensor_to_image_refuses_other_shapes_naming_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"got shape \({', '.join(map(str, shape))}\)"):
        tensor_to_image(torch.zeros(shape))


# tensors


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel() -> None:
    tensor = torch.rand(2, 3, 4, 4)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    expected = torch.stack([(tensor[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(normalize(tensor, mean, std), expected)


def test_normalize_refuses_a_zero_std_and_integer_tensors() -> None:
    with pytest.raises(ValueError, match="zero"):
        normalize(torch.rand(3, 2, 2), [0.5] * 3, [0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="int64"):
        normalize(torch.zeros(3, 2, 2, dtype=torch.int64), [0.5] * 3, [0.2] * 3)


def gaussian(size: int, sigma: float) -> list[float]:
    weights = [math.exp(-0.5 * ((i - (size - 1) / 2) / sigma) ** 2) for i in range(size)]
    return [w / sum(weights) for w in weights]


def test_gaussian_blur_of_a_point_is_the_gaussian_kernel() -> None:
    point = torch.zeros(1, 2, 9, 9)
    point[:, :, 4, 4] = 1.0
    blurred = gaussian_blur(point, kernel_size=(5, 3), sigma=(1.5, 0.7))
    expected = torch.outer(torch.tensor(gaussian(3, 0.7)), torch.tensor(gaussian(5, 1.5)))
    assert blurred.shape == point.shape
    assert torch.allclose(blurred[0, 1, 3:6, 2:7], expected, atol=1e-6)
    assert blurred.sum().item() == pytest.approx(2.0)


def test_gaussian_blur_default_sigma_is_refiners_one_and_constants_stay_constant() -> None:
    point = torch.zeros(3, 7, 7)
    point[:, 3, 3] = 1.0
    default = gaussian_blur(point, kernel_size=5)
    assert torch.allclose(default, gaussian_blur(point, kernel_size=5, sigma=0.15 * 5 + 0.35))
    constant = torch.full((2, 2, 3, 6, 6), 0.25)
    assert torch.allclose(gaussian_blur(constant, 3), constant)


def test_gaussian_blur_refuses_an_even_kernel_and_integer_tensors() -> None:
    with pytest.raises(ValueError, match="kernel_size must be positive and odd, got 4"):
        gaussian_blur(torch.zeros(1, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="int64"):
        gaussian_blur(torch.zeros(1, 1, 8, 8, dtype=torch.int64), 3)


def test_interpolate_takes_a_scale_factor_or_a_size() -> None:
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert interpolate(x, 2.0).shape == (1, 1, 4, 4)
    assert torch.equal(interpolate(x, 2.0)[0, 0, :2, :2], torch.zeros(2, 2))
    assert interpolate(x, torch.Size((3, 5)), mode="bilinear").shape == (1, 1, 3, 5)


def test_summarize_tensor_gives_shape_dtype_device_and_statistics() -> None:
    tensor = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert summarize_tensor(tensor) == (
        "Tensor(shape=(2, 2), dtype=float32, device=cpu, min=1.00, max=4.00, mean=2.50, std=1.29, norm=5.48, "
        "grad=False)"
    )
    complex_summary = summarize_tensor(torch.tensor([1 + 1j, 3 - 1j]))
    assert "dtype=complex64" in complex_summary and "min=" not in complex_summary and "mean=2.00" in complex_summary
    assert "grad=True" in summarize_tensor(torch.ones(2, requires_grad=True))


def test_importing_fluxion_does_not_import_the_utilities() -> None:
    code = "import sys, refiners_core.fluxion; print('refiners_core.fluxion.utils' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
