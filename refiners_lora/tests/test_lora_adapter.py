"""`LoraAdapter` and `Lora` on Linear and Conv2d targets (float32, CPU; exact unless a tolerance is stated)."""

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_lora import Lora, LoraAdapter

T = TypeVar("T", bound=fl.Module)


def at(chain: fl.Chain, path: str, kind: type[T]) -> T:
    """The layer at `path`, checked to be a `kind`."""
    layer = chain[path]
    assert isinstance(layer, kind), f"{path} is a {type(layer).__name__}, not a {kind.__name__}"
    return layer


def weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a LoRA projection."""
    assert isinstance(layer, (fl.Linear, fl.Conv2d))
    return layer.weight


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


def linear_model() -> fl.Chain:
    return fl.Chain(fl.Linear(6, 8), fl.SiLU(), fl.Linear(8, 6))


def conv_model() -> fl.Chain:
    return fl.Chain(fl.Conv2d(3, 8, kernel_size=3, stride=2, padding=1), fl.SiLU(), fl.Conv2d(8, 4, kernel_size=1))


def randomize_up(adapter: LoraAdapter) -> None:
    with torch.no_grad():
        weight(adapter.lora.up).normal_()


def test_fresh_lora_on_a_linear_leaves_the_output_unchanged() -> None:
    model = linear_model()
    x = torch.randn(4, 6)
    expected = model(x)
    LoraAdapter(at(model, "Linear_1", fl.Linear), rank=3).inject()
    assert isinstance(model["Linear_1"], LoraAdapter)
    assert torch.equal(model(x), expected)


def test_lora_on_a_linear_has_zero_up_and_random_down_of_the_right_shapes() -> None:
    target = fl.Linear(6, 8)
    adapter = LoraAdapter(target, rank=3)
    down, up = adapter.lora.down, adapter.lora.up
    assert isinstance(down, fl.Linear) and isinstance(up, fl.Linear)
    assert down.weight.shape == (3, 6) and up.weight.shape == (8, 3)
    assert down.bias is None and up.bias is None
    assert torch.equal(up.weight, torch.zeros(8, 3))
    assert down.weight.std() > 0.05
    assert torch.unique(down.weight).numel() == down.weight.numel()
    assert adapter.rank == 3 and adapter.lora.rank == 3
    assert adapter.scale == 1.0


def test_lora_on_a_linear_computes_target_plus_scaled_low_rank_update() -> None:
    target = fl.Linear(6, 8)
    adapter = LoraAdapter(target, rank=3, scale=0.5)
    randomize_up(adapter)
    x = torch.randn(4, 6)
    down, up = weight(adapter.lora.down), weight(adapter.lora.up)
    expected = F.linear(x, target.weight, target.bias) + 0.5 * (x @ down.T @ up.T)
    torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("make_model", [linear_model, conv_model], ids=["linear", "conv2d"])
def test_stacked_loras_sum_in_place_without_autograd_as_they_do_with_it(
    grad_mode: str, make_model: Callable[[], fl.Chain]
) -> None:
    """Without autograd each adapter adds into its target's fresh output; the result is the autograd one."""
    model = make_model()
    targets = [layer for layer in model if isinstance(layer, (fl.Linear, fl.Conv2d))]
    for target in targets:
        for scale in (0.5, -2.0, 1.5):  # three LoRAs stacked on the same layer
            adapter = LoraAdapter(target, rank=2, scale=scale)
            randomize_up(adapter)
            adapter.inject()
    x = torch.randn(2, 6) if isinstance(targets[0], fl.Linear) else torch.randn(2, 3, 9, 9)
    kept = x.clone()
    expected = model(x)
    assert expected.requires_grad
    with torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(x, kept)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected.detach(), atol=1e-6, rtol=1e-6)


def test_lora_on_a_linear_without_bias() -> None:
    target = fl.Linear(6, 8, bias=False)
    adapter = LoraAdapter(target, rank=2)
    x = torch.randn(4, 6)
    assert torch.equal(adapter(x), target(x))


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation"),
    [(3, 2, 1, 1), (3, 1, 1, 1), (3, 1, 2, 2), (5, 3, 0, 1), (1, 1, 0, 1)],
)
def test_lora_on_a_conv2d_keeps_the_target_output_shape(
    kernel_size: int, stride: int, padding: int, dilation: int
) -> None:
    target = fl.Conv2d(3, 8, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    adapter = LoraAdapter(target, rank=4)
    x = torch.randn(2, 3, 11, 13)
    assert torch.equal(adapter(x), target(x))  # fresh: unchanged
    randomize_up(adapter)
    out = adapter(x)
    assert out.shape == target(x).shape
    assert not torch.allclose(out, target(x))


def test_lora_on_a_conv2d_matches_a_manual_locon() -> None:
    target = fl.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    adapter = LoraAdapter(target, rank=4, scale=2.0)
    randomize_up(adapter)
    down, up = adapter.lora.down, adapter.lora.up
    assert isinstance(down, fl.Conv2d) and isinstance(up, fl.Conv2d)
    assert down.weight.shape == (4, 3, 3, 3) and up.weight.shape == (8, 4, 1, 1)
    assert down.stride == (2, 2) and down.padding == (1, 1)
    x = torch.randn(2, 3, 9, 9)
    low_rank = F.conv2d(F.conv2d(x, down.weight, stride=2, padding=1), up.weight)
    expected = F.conv2d(x, target.weight, target.bias, stride=2, padding=1) + 2.0 * low_rank
    torch.testing.assert_close(adapter(x), expected, atol=1e-5, rtol=1e-5)


def test_fresh_lora_on_a_conv2d_in_a_model_leaves_the_output_unchanged() -> None:
    model = conv_model()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    LoraAdapter(at(model, "Conv2d_1", fl.Conv2d), rank=2).inject()
    assert torch.equal(model(x), expected)


def test_only_the_lora_weights_are_new_parameters() -> None:
    model = linear_model()
    before = dict(model.named_parameters())
    adapter = LoraAdapter(at(model, "Linear_2", fl.Linear), rank=2).inject()
    after = dict(model.named_parameters())
    old_ids = {id(p) for p in before.values()}
    new = {name for name, p in after.items() if id(p) not in old_ids}
    assert new == {"Linear_2.Lora.down.weight", "Linear_2.Lora.up.weight"}
    assert {id(p) for p in after.values()} >= old_ids
    assert {id(p) for p in adapter.lora.parameters()} == {id(after[name]) for name in new}
    assert all(after[name].requires_grad for name in new)


def test_scale_setter_changes_the_output_linearly() -> None:
    target = fl.Linear(6, 8)
    adapter = LoraAdapter(target, rank=3)
    randomize_up(adapter)
    x = torch.randn(4, 6)
    base = target(x)
    delta = adapter(x) - base
    for scale in (0.0, 0.5, -2.0, 3.0):
        adapter.scale = scale
        assert adapter.scale == scale and adapter.lora.scale == scale
        torch.testing.assert_close(adapter(x) - base, scale * delta, atol=1e-5, rtol=1e-5)
    adapter.scale = 0.0
    assert torch.equal(adapter(x), base)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_is_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match=str(rank)):
        LoraAdapter(fl.Linear(4, 4), rank=rank)


@pytest.mark.parametrize(
    "target",
    [fl.LayerNorm(4), fl.ConvTranspose2d(2, 2, kernel_size=3), nn.Linear(4, 4), fl.Chain(fl.Linear(4, 4))],
    ids=["layer-norm", "conv-transpose", "torch-linear", "chain"],
)
def test_a_target_other_than_linear_or_conv2d_is_rejected_with_type_error(target: nn.Module) -> None:
    with pytest.raises(TypeError, match=type(target).__name__):
        LoraAdapter(target, rank=2)  # type: ignore[arg-type]


def test_a_target_that_is_not_adapted_is_left_untouched_by_a_rejected_adapter() -> None:
    model = fl.Chain(fl.LayerNorm(4))
    with pytest.raises(TypeError):
        LoraAdapter(model["LayerNorm"], rank=2)  # type: ignore[arg-type]
    assert model["LayerNorm"].parent is model


def test_grouped_convolutions_are_rejected() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        LoraAdapter(fl.Conv2d(4, 4, kernel_size=3, groups=2), rank=2)


def test_device_and_dtype_default_to_the_target() -> None:
    target = fl.Linear(4, 4, dtype=torch.float64)
    adapter = LoraAdapter(target, rank=2)
    assert all(p.dtype == torch.float64 for p in adapter.lora.parameters())
    assert all(p.device == target.weight.device for p in adapter.lora.parameters())
    x = torch.randn(3, 4, dtype=torch.float64)
    assert adapter(x).dtype == torch.float64
    conv = fl.Conv2d(2, 2, kernel_size=3, dtype=torch.float64)
    assert LoraAdapter(conv, rank=1).lora.down.weight.dtype == torch.float64


def test_moving_the_model_moves_injected_loras() -> None:
    model = conv_model()
    adapter = LoraAdapter(at(model, "Conv2d_1", fl.Conv2d), rank=2).inject()
    model.to(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.lora.parameters())
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64
    adapter.eject()
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_explicit_dtype_overrides_the_target_dtype() -> None:
    adapter = LoraAdapter(fl.Linear(4, 4), rank=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.lora.parameters())


def test_eject_restores_state_dict_outputs_and_target() -> None:
    model = linear_model()
    x = torch.randn(4, 6)
    expected = model(x)
    keys = list(model.state_dict())
    tensors = [t.clone() for t in model.state_dict().values()]
    target = at(model, "Linear_1", fl.Linear)
    adapter = LoraAdapter(target, rank=2).inject()
    randomize_up(adapter)
    assert not torch.allclose(model(x), expected)
    adapter.eject()
    assert model["Linear_1"] is target
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tensors, strict=True))
    assert torch.equal(model(x), expected)


def test_injection_keeps_sibling_names() -> None:
    model = linear_model()
    LoraAdapter(at(model, "Linear_2", fl.Linear), rank=2).inject()
    assert list(dict(model.named_children())) == ["Linear_1", "SiLU", "Linear_2"]
    assert "Linear_2.Linear.weight" in model.state_dict()


def test_gradients_reach_only_the_lora_when_the_model_is_frozen() -> None:
    model = linear_model()
    model.requires_grad_(False)
    adapter = LoraAdapter(at(model, "Linear_1", fl.Linear), rank=2).inject()
    model(torch.randn(4, 6)).square().sum().backward()
    for name, parameter in model.named_parameters():
        if ".Lora." in name:
            assert parameter.requires_grad and parameter.grad is not None, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    up_grad, down_grad = weight(adapter.lora.up).grad, weight(adapter.lora.down).grad
    assert up_grad is not None and up_grad.abs().sum() > 0
    assert down_grad is not None and torch.equal(
        down_grad, torch.zeros_like(down_grad)
    )  # up is zero: nothing flows back yet


def test_a_lora_module_is_a_fluxion_layer() -> None:
    lora = Lora(fl.Linear(4, 6), rank=2, scale=1.5)
    assert isinstance(lora, fl.Module)
    assert repr(lora) == "Lora(rank=2, scale=1.5)"


def test_compiled_model_with_lora_matches_eager(fresh_dynamo: None) -> None:
    model = fl.Chain(
        fl.Residual(fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()), fl.Attention(8, num_heads=2)),
        fl.Unflatten(2, (2, 4)),
        fl.Conv2d(5, 5, kernel_size=3, padding=1),
    )
    for linear, parent in model.ensure_find(fl.Attention).walk(fl.Linear):
        randomize_up(LoraAdapter(linear, rank=2).inject(parent))  # type: ignore[arg-type]
    randomize_up(LoraAdapter(at(model, "Conv2d", fl.Conv2d), rank=2).inject())
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=0)
