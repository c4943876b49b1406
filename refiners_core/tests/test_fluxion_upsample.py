"""`fl.Upsample` computed at the input resolution against interpolate-then-convolve (its layers run one by one).

Reference: `F.conv2d(F.interpolate(x, size, mode="nearest"), weight, bias, padding=1)`. Tolerance: relative 1e-5
(to the largest output) in float32, 1e-12 in float64; the two compute the same sums in a different order.
"""

import pytest
import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion.layers.sampling import upsample_nearest_conv3x3
from refiners_core.testing import assert_relative_close


class Doubled(fl.Chain, fl.Adapter[fl.Conv2d]):
    """An adapter defined here: `2 * target(x)`."""

    def __init__(self, target: fl.Conv2d) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Multiply(2.0))


def naive(upsample: fl.Upsample, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    conv = upsample.ensure_find(fl.Conv2d)
    scale_factor = 2.0 if size is None else None
    upsampled = F.interpolate(x, size=size, scale_factor=scale_factor, mode="nearest")
    return F.conv2d(upsampled, conv.weight, conv.bias, padding=1)


def with_skip(upsample: fl.Upsample, skip: torch.Tensor) -> fl.Chain:
    """`upsample` inside a model whose context `unet.skip` holds `skip`."""
    model = fl.Chain(upsample)
    model.set_context("unet", {"skip": skip})
    return model


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 8, 1, 1), (3, 8, 6, 4)])
def test_upsample_equals_interpolate_then_conv(
    dtype: torch.dtype, tolerance: float, shape: tuple[int, int, int, int]
) -> None:
    torch.manual_seed(0)
    upsample = fl.Upsample(8, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert_relative_close(upsample(x), naive(upsample, x), tolerance)


def test_upsample_without_bias_equals_interpolate_then_conv() -> None:
    torch.manual_seed(1)
    conv = fl.Conv2d(4, 6, kernel_size=3, padding=1, use_bias=False)
    x = torch.randn(2, 4, 5, 3)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert_relative_close(upsample_nearest_conv3x3(x, conv.weight, None), expected, 1e-5)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_upsample_gradients_equal_those_of_interpolate_then_conv(dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(2)
    upsample = fl.Upsample(6, dtype=dtype)
    conv = upsample.ensure_find(fl.Conv2d)
    x = torch.randn(2, 6, 5, 4, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(2, 6, 10, 8, dtype=dtype)
    assert conv.bias is not None
    parameters = (x, conv.weight, conv.bias)
    fast = torch.autograd.grad(upsample(x), parameters, grad_output)
    reference = torch.autograd.grad(naive(upsample, x), parameters, grad_output)
    for actual, expected in zip(fast, reference, strict=True):
        assert_relative_close(actual, expected, tolerance)


@torch.no_grad()
def test_upsample_runs_an_adapter_injected_on_its_conv_and_recovers_the_fast_path_on_eject() -> None:
    torch.manual_seed(3)
    upsample = fl.Upsample(8)
    x = torch.randn(2, 8, 5, 7)
    expected = naive(upsample, x)
    adapter = Doubled(upsample.ensure_find(fl.Conv2d)).inject(upsample)
    assert [type(layer) for layer in upsample] == [fl.Interpolate, Doubled]
    assert_relative_close(upsample(x), 2 * expected, 1e-5)
    adapter.eject()
    assert torch.equal(upsample(x), upsample_nearest_conv3x3(x, *_conv_parameters(upsample)))


@torch.no_grad()
def test_upsample_runs_its_layers_when_the_conv_is_not_a_plain_3x3() -> None:
    torch.manual_seed(4)
    upsample = fl.Upsample(4)
    upsample.replace(upsample[1], fl.Conv2d(4, 4, kernel_size=3, padding=2, dilation=2))
    x = torch.randn(1, 4, 5, 5)
    conv = upsample.ensure_find(fl.Conv2d)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.equal(upsample(x), expected)


def test_upsample_keeps_its_layers_and_state_dict_keys() -> None:
    upsample = fl.Upsample(4)
    assert [type(layer) for layer in upsample] == [fl.Interpolate, fl.Conv2d]
    assert list(upsample.state_dict()) == ["Conv2d.weight", "Conv2d.bias"]
    sized = fl.Upsample(4, size_of=("unet", "skip"))
    assert list(sized.state_dict()) == ["Conv2d.weight", "Conv2d.bias"]
    assert "size_of=unet.skip" in repr(sized)


@pytest.mark.parametrize(("shape", "size"), [((2, 8, 5, 7), (10, 14)), ((2, 8, 4, 3), (7, 5)), ((1, 8, 3, 3), (6, 5))])
def test_upsample_to_the_size_of_a_context_tensor(shape: tuple[int, int, int, int], size: tuple[int, int]) -> None:
    """Exactly twice the input: computed at the input resolution; any other size (odd skips): layer by layer."""
    torch.manual_seed(5)
    upsample = fl.Upsample(8, size_of=("unet", "skip"))
    model = with_skip(upsample, torch.zeros(1, 1, *size))
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape[-2:] == size
    assert_relative_close(out, naive(upsample, x, size), 1e-5)
    if size != (2 * shape[-2], 2 * shape[-1]):
        assert torch.equal(out, naive(upsample, x, size))


def test_interpolate_size_of_names_the_missing_context_key() -> None:
    model = fl.Chain(fl.Interpolate(size_of=("unet", "skip")))
    model.set_context("unet", {})
    with pytest.raises(fl.ContextError, match="skip"):
        model(torch.randn(1, 1, 2, 2))


@pytest.mark.parametrize("size_of", [None, ("unet", "skip")])
def test_upsample_compiles_without_graph_break(size_of: tuple[str, str] | None) -> None:
    """`fullgraph=True` fails on any graph break; `aot_eager` traces forward and backward without codegen."""
    torch.manual_seed(6)
    upsample = fl.Upsample(4, size_of=size_of)
    model = with_skip(upsample, torch.zeros(1, 1, 10, 8))
    x = torch.randn(2, 4, 5, 4, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert_relative_close(out, model(x), 1e-6)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(naive(upsample, x).sum(), x)
    assert_relative_close(grad, expected, 1e-5)


def _conv_parameters(upsample: fl.Upsample) -> tuple[torch.Tensor, torch.Tensor | None]:
    conv = upsample.ensure_find(fl.Conv2d)
    return conv.weight, conv.bias
