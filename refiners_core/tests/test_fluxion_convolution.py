"""`fl.Conv2d` through `conv2d`: its im2col path (large kernels on few output pixels, CPU float32) against `F.conv2d`.

Most tests lower the thresholds of the im2col path so that small layers take it; `F.conv2d` is made to fail while
our layer runs, which proves the path was taken. Tolerance: relative 1e-5 (to the largest value) in float32; the two
compute the same sums in a different order.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion.layers import convolution
from refiners_core.testing import assert_relative_close


@pytest.fixture
def im2col_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convolution, "IM2COL_MIN_WEIGHTS", 1)
    monkeypatch.setattr(convolution, "IM2COL_MAX_PIXELS", 10**9)


@contextmanager
def f_conv2d_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within this block `F.conv2d` raises: a result computed there came from the im2col path."""

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("F.conv2d was called: the im2col path was not taken")

    with monkeypatch.context() as patch:
        patch.setattr(F, "conv2d", fail)
        yield


def reference(conv: fl.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def assert_im2col_matches_f_conv2d(conv: fl.Conv2d, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """`conv(x)` takes the im2col path (`F.conv2d` forbidden), gives a contiguous tensor within 1e-5 of `F.conv2d`."""
    expected = reference(conv, x)
    with f_conv2d_forbidden(monkeypatch):
        actual = conv(x)
    assert actual.is_contiguous()
    assert_relative_close(actual, expected, 1e-5)


@pytest.mark.usefixtures("im2col_everywhere")
@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation", "use_bias"),
    [
        (3, 1, 1, 1, True),
        (3, 2, 1, 1, True),
        (3, 1, 0, 1, False),
        (1, 1, 0, 1, True),
        (3, 1, 2, 2, True),
        (2, 2, 0, 1, True),
    ],
)
def test_conv2d_im2col_path_equals_f_conv2d(
    kernel_size: int, stride: int, padding: int, dilation: int, use_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    conv = fl.Conv2d(6, 5, kernel_size, stride=stride, padding=padding, dilation=dilation, use_bias=use_bias)
    assert_im2col_matches_f_conv2d(conv, torch.randn(3, 6, 7, 9), monkeypatch)


@pytest.mark.usefixtures("im2col_everywhere")
def test_conv2d_im2col_path_gradients_equal_those_of_f_conv2d() -> None:
    torch.manual_seed(1)
    conv = fl.Conv2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    grad_output = torch.randn(2, 6, 3, 3)
    assert conv.bias is not None
    inputs = (x, conv.weight, conv.bias)
    actual = torch.autograd.grad(conv(x), inputs, grad_output)
    expected = torch.autograd.grad(reference(conv, x), inputs, grad_output)
    for got, wanted in zip(actual, expected, strict=True):
        assert got.is_contiguous()
        assert_relative_close(got, wanted, 1e-5)


@torch.no_grad()
def test_conv2d_takes_the_im2col_path_only_for_a_large_kernel_on_few_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real thresholds: 768 x 640 x 3 x 3 = 4.4 Mi weights; 2 x 8 x 8 output pixels, then 2 x 16 x 16."""
    torch.manual_seed(2)
    conv = fl.Conv2d(768, 640, 3, padding=1)
    small = torch.randn(2, 768, 8, 8)
    assert_im2col_matches_f_conv2d(conv, small, monkeypatch)
    large = torch.randn(2, 768, 16, 16)
    assert torch.equal(conv(large), reference(conv, large))  # F.conv2d itself: bit for bit
    small_kernel = fl.Conv2d(64, 64, 3, padding=1)
    assert torch.equal(small_kernel(small[:, :64]), reference(small_kernel, small[:, :64]))


@pytest.mark.usefixtures("im2col_everywhere")
@torch.no_grad()
def test_conv2d_keeps_f_conv2d_for_other_padding_modes_groups_and_dtypes() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, 5)
    for conv in (
        fl.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        fl.Conv2d(4, 4, 3, padding=1, groups=2),
        fl.Conv2d(4, 4, 3, padding="same"),
    ):
        expected = conv._conv_forward(x, conv.weight, conv.bias)  # pyright: ignore[reportPrivateUsage]
        assert torch.equal(conv(x), expected)
    double = fl.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    assert torch.equal(double(x.double()), reference(double, x.double()))


@pytest.mark.usefixtures("im2col_everywhere")
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 8, 1, 1)])
def test_upsample_through_the_im2col_path_equals_interpolate_then_conv(
    shape: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(4)
    upsample = fl.Upsample(8)
    conv = upsample.ensure_find(fl.Conv2d)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
        with f_conv2d_forbidden(monkeypatch):
            actual = upsample(x)
    assert actual.is_contiguous()
    assert_relative_close(actual, expected, 1e-5)


@pytest.mark.usefixtures("im2col_everywhere", "fresh_dynamo")
def test_conv2d_im2col_path_compiles_without_graph_break() -> None:
    """`fullgraph=True` fails on any graph break; `aot_eager` traces forward and backward without codegen."""
    torch.manual_seed(5)
    model = fl.Chain(fl.Conv2d(4, 6, 3, padding=1), fl.SiLU(), fl.Conv2d(6, 4, 3, stride=2, padding=1))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert out.is_contiguous()
    assert_relative_close(out, model(x), 1e-6)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.is_contiguous()
    assert_relative_close(grad, expected, 1e-5)
