"""Every Fluxion layer against its torch functional equivalent (float32; exact unless a tolerance is stated)."""

import math
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch.nn import functional as F

import refiners_core.fluxion as fl

T = TypeVar("T", bound=fl.Module)


def at(chain: fl.Chain, path: str, kind: type[T]) -> T:
    """The layer at `path`, checked to be a `kind`."""
    layer = chain[path]
    assert isinstance(layer, kind), f"{path} is a {type(layer).__name__}, not a {kind.__name__}"
    return layer


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


# Combinators


def test_lambda_applies_its_function_to_all_inputs() -> None:
    layer = fl.Lambda(lambda a, b: a * b + 1)
    a, b = torch.randn(3), torch.randn(3)
    assert torch.equal(layer(a, b), a * b + 1)
    assert torch.equal(fl.Chain(fl.Lambda(torch.exp))(a), torch.exp(a))


def test_sum_adds_the_outputs_of_every_layer_on_the_same_input() -> None:
    x = torch.randn(2, 3)
    assert torch.equal(fl.Sum(fl.Multiply(2.0), fl.Multiply(3.0), fl.Identity())(x), 2 * x + 3 * x + x)


def test_concatenate_joins_outputs_along_dim() -> None:
    x = torch.randn(2, 3)
    out = fl.Concatenate(fl.Identity(), fl.Multiply(2.0), dim=1)(x)
    assert torch.equal(out, torch.cat([x, 2 * x], dim=1))
    assert fl.Concatenate(fl.Identity(), fl.Identity())(x).shape == (4, 3)


def test_passthrough_runs_its_layers_and_returns_its_input() -> None:
    model = fl.Chain(fl.Passthrough(fl.Multiply(3.0), fl.SetContext("store", "x")), fl.Multiply(2.0))
    model.set_context("store", {})
    x = torch.randn(4)
    assert torch.equal(model(x), 2 * x)
    assert torch.equal(model.use_context("store")["x"], 3 * x)


def test_passthrough_returns_every_input_when_given_several() -> None:
    a, b = torch.randn(2), torch.randn(2)
    out = fl.Passthrough(fl.Lambda(lambda x, y: x + y))(a, b)
    assert isinstance(out, tuple) and out[0] is a and out[1] is b


def test_residual_adds_its_first_input() -> None:
    x = torch.randn(2, 3)
    assert torch.equal(fl.Residual(fl.Multiply(3.0))(x), x + 3 * x)
    y = torch.randn(2, 3)
    assert torch.equal(fl.Residual(fl.Lambda(lambda a, b: a * b))(x, y), x + x * y)


def test_parallel_feeds_every_layer_the_same_inputs() -> None:
    x = torch.randn(3)
    out = fl.Parallel(fl.Identity(), fl.Multiply(2.0), fl.Multiply(bias=1.0))(x)
    assert isinstance(out, tuple)
    assert [o.tolist() for o in out] == [x.tolist(), (2 * x).tolist(), (x + 1).tolist()]


def test_distribute_feeds_the_i_th_input_to_the_i_th_layer() -> None:
    a, b = torch.randn(3), torch.randn(3)
    out = fl.Distribute(fl.Multiply(2.0), fl.Multiply(3.0))(a, b)
    assert torch.equal(out[0], 2 * a) and torch.equal(out[1], 3 * b)


def test_chain_unpacks_a_tuple_output_into_the_next_layer_arguments() -> None:
    x = torch.randn(2, 6)
    out = fl.Chain(fl.Chunk(2, dim=1), fl.Lambda(lambda a, b: a - b))(x)
    assert torch.equal(out, x[:, :3] - x[:, 3:])


# Tensor plumbing


def test_identity_returns_its_input() -> None:
    x = torch.randn(2)
    assert fl.Identity()(x) is x


@pytest.mark.parametrize(
    ("dim", "start", "end", "step"), [(0, 1, 3, 1), (1, 0, None, 2), (-1, 2, 5, 1), (2, -3, None, 1)]
)
def test_slicing_matches_python_slicing_along_dim(dim: int, start: int, end: int | None, step: int) -> None:
    x = torch.randn(4, 5, 6)
    index: list[slice] = [slice(None)] * 3
    index[dim] = slice(start, end, step)
    assert torch.equal(fl.Slicing(dim=dim, start=start, end=end, step=step)(x), x[tuple(index)])


def test_flatten_matches_torch_flatten() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(fl.Flatten()(x), torch.flatten(x))
    assert torch.equal(fl.Flatten(1, 2)(x), torch.flatten(x, 1, 2))
    assert fl.Flatten(-2)(x).shape == (2, 3, 20)


def test_unflatten_matches_torch_unflatten() -> None:
    x = torch.randn(2, 12)
    assert torch.equal(fl.Unflatten(1, (3, 4))(x), x.unflatten(1, (3, 4)))


def test_permute_transpose_reshape() -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(fl.Permute(2, 0, 1)(x), x.permute(2, 0, 1))
    assert torch.equal(fl.Transpose(0, 2)(x), x.transpose(0, 2))
    assert torch.equal(fl.Reshape(4, 3)(x), x.reshape(2, 4, 3))
    assert torch.equal(fl.Reshape(-1)(x), x.reshape(2, 12))


def test_reshape_keeps_the_batch_dimension() -> None:
    assert fl.Reshape(6)(torch.randn(5, 2, 3)).shape == (5, 6)


def test_squeeze_and_unsqueeze() -> None:
    x = torch.randn(2, 1, 3)
    assert torch.equal(fl.Squeeze(1)(x), x.squeeze(1))
    assert torch.equal(fl.Unsqueeze(0)(x), x.unsqueeze(0))
    assert fl.Unsqueeze(-1)(x).shape == (2, 1, 3, 1)


def test_chunk_returns_a_tuple_of_pieces() -> None:
    x = torch.randn(6, 4)
    pieces = fl.Chunk(3, dim=0)(x)
    assert isinstance(pieces, tuple) and len(pieces) == 3
    for piece, expected in zip(pieces, x.chunk(3, dim=0), strict=True):
        assert torch.equal(piece, expected)


def test_get_arg_picks_one_of_several_inputs() -> None:
    a, b, c = torch.randn(1), torch.randn(2), torch.randn(3)
    assert fl.GetArg(1)(a, b, c) is b
    assert fl.Chain(fl.Parallel(fl.Identity(), fl.Multiply(2.0)), fl.GetArg(1))(a).item() == 2 * a.item()


def test_multiply_scales_and_shifts() -> None:
    x = torch.randn(3)
    assert torch.equal(fl.Multiply(2.0, 1.0)(x), x * 2.0 + 1.0)


# Normalisations


def test_layer_norm_matches_functional_layer_norm() -> None:
    layer = fl.LayerNorm(8)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 8)
    assert torch.equal(layer(x), F.layer_norm(x, (8,), layer.weight, layer.bias, 1e-5))


def test_group_norm_takes_channels_then_groups_and_matches_functional_group_norm() -> None:
    layer = fl.GroupNorm(channels=8, num_groups=4)
    assert layer.num_channels == 8 and layer.num_groups == 4
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(layer(x), F.group_norm(x, 4, layer.weight, layer.bias, 1e-5))


def test_layer_norm_2d_normalises_channels_at_each_pixel() -> None:
    layer = fl.LayerNorm2d(6)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 6, 4, 5) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    expected = (x - mean) / torch.sqrt(variance + 1e-6) * layer.weight[:, None, None] + layer.bias[:, None, None]
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# Convolutions and sampling


def test_conv2d_matches_functional_conv2d() -> None:
    layer = fl.Conv2d(4, 6, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1))
    assert fl.Conv2d(4, 6, kernel_size=1, use_bias=False).bias is None


def test_conv_transpose_2d_matches_functional_conv_transpose2d() -> None:
    layer = fl.ConvTranspose2d(4, 6, kernel_size=3, stride=2, padding=1, output_padding=1)
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv_transpose2d(x, layer.weight, layer.bias, stride=2, padding=1, output_padding=1)
    out = layer(x)
    assert out.shape == (2, 6, 10, 10)
    assert torch.equal(out, expected)


Reference = Callable[[torch.Tensor, fl.Conv2d], torch.Tensor]


@pytest.mark.parametrize(
    ("padding", "reference"),
    [
        (1, lambda x, conv: F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)),
        (0, lambda x, conv: F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)),
    ],
    ids=["padding 1: a padded stride-2 conv", "padding 0: pads right and bottom only"],
)
def test_downsample_is_a_stride_2_conv(padding: int, reference: Reference) -> None:
    layer = fl.Downsample(4, padding=padding)
    conv = layer.ensure_find(fl.Conv2d)
    x = torch.randn(2, 4, 8, 8)
    out = layer(x)
    assert out.shape == (2, 4, 4, 4)
    assert torch.equal(out, reference(x, conv))


def test_upsample_is_nearest_doubling_then_a_3x3_conv() -> None:
    layer = fl.Upsample(4)
    conv = layer.ensure_find(fl.Conv2d)
    x = torch.randn(2, 4, 5, 5)
    out = layer(x)
    assert out.shape == (2, 4, 10, 10)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
    # Computed at the input resolution (see test_fluxion_upsample.py): equal up to float32 rounding.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_interpolate_by_size_and_by_scale_factor() -> None:
    x = torch.randn(1, 2, 4, 6)
    assert torch.equal(fl.Interpolate(size=(8, 3), mode="bilinear")(x), F.interpolate(x, size=(8, 3), mode="bilinear"))
    assert torch.equal(fl.Interpolate(scale_factor=2.0)(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with pytest.raises(ValueError):
        fl.Interpolate()


def test_pad_matches_functional_pad() -> None:
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(fl.Pad((1, 2, 0, 1), value=5.0)(x), F.pad(x, (1, 2, 0, 1), value=5.0))
    assert torch.equal(fl.Pad((1, 1, 1, 1), mode="reflect")(x), F.pad(x, (1, 1, 1, 1), mode="reflect"))


# Activations


@pytest.mark.parametrize(
    ("layer", "function"),
    [
        (fl.SiLU(), F.silu),
        (fl.ReLU(), F.relu),
        (fl.GeLU(), F.gelu),
        (fl.GeLU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
        (fl.Sigmoid(), torch.sigmoid),
        (fl.Tanh(), torch.tanh),
        (fl.Softmax(), lambda x: torch.softmax(x, dim=-1)),
        (fl.Softmax(dim=0), lambda x: torch.softmax(x, dim=0)),
    ],
    ids=["silu", "relu", "gelu", "gelu-tanh", "sigmoid", "tanh", "softmax", "softmax-dim0"],
)
def test_activation_matches_torch(layer: fl.Module, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = torch.randn(3, 5) * 3
    assert torch.equal(layer(x), function(x))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-15)])
def test_quick_gelu_and_its_gradient_match_x_sigmoid_1702x(dtype: torch.dtype, tolerance: float) -> None:
    """Computed as `silu(1.702 x) / 1.702`: the same function up to float rounding (relative tolerance)."""
    x = (torch.randn(3, 5, dtype=dtype) * 3).requires_grad_()
    expected = x * torch.sigmoid(1.702 * x)
    actual = fl.QuickGeLU()(x)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    grad_output = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(actual, x, grad_output)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_output)
    torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)


def test_gelu_tanh_differs_from_exact_gelu() -> None:
    x = torch.linspace(-3, 3, 20)
    assert not torch.equal(fl.GeLU()(x), fl.GeLU(approximate="tanh")(x))


# Learned layers


def test_embedding_looks_up_rows() -> None:
    layer = fl.Embedding(10, 4)
    indices = torch.tensor([[1, 3], [9, 0]])
    assert torch.equal(layer(indices), F.embedding(indices, layer.weight))
    assert layer(indices).shape == (2, 2, 4)


def test_dropout_is_identity_in_eval_and_drops_in_train() -> None:
    layer = fl.Dropout(p=0.5)
    x = torch.ones(1000)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    out = layer(x)
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_linear_matches_functional_linear() -> None:
    layer = fl.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert fl.Linear(4, 3, bias=False).bias is None


def test_linear_honours_device_and_dtype() -> None:
    layer = fl.Linear(4, 3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.dtype == torch.float64


def test_multi_linear_stacks_linears_with_activations() -> None:
    mlp = fl.MultiLinear(input_dim=4, output_dim=2, inner_dim=8, num_layers=3)
    linears = list(mlp.layers(fl.Linear))
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(4, 8), (8, 8), (8, 2)]
    x = torch.randn(5, 4)
    activations = list(mlp.walk(lambda layer, parent: not isinstance(layer, fl.Linear)))
    assert len(activations) == 2
    activation = activations[0][0]
    expected = x
    for index, linear in enumerate(linears):
        if index > 0:
            expected = activation(expected)
        expected = linear(expected)
    assert torch.equal(mlp(x), expected)


def test_multi_linear_with_a_single_layer_maps_input_to_output() -> None:
    mlp = fl.MultiLinear(input_dim=4, output_dim=2, inner_dim=8, num_layers=1)
    assert mlp(torch.randn(3, 4)).shape == (3, 2)


def test_multi_linear_uses_relu_between_layers_like_refiners() -> None:
    # Refiners' MultiLinear (used e.g. by SAM's mask decoder MLPs) puts ReLU between its Linear layers.
    mlp = fl.MultiLinear(input_dim=4, output_dim=2, inner_dim=8, num_layers=3)
    assert [type(layer) for layer in mlp] == [fl.Linear, fl.ReLU, fl.Linear, fl.ReLU, fl.Linear]


def test_parameter_returns_its_weight_for_each_sample_and_ignores_the_input() -> None:
    layer = fl.Parameter(3, 4)
    out = layer(torch.randn(5, 7))
    assert out.shape == (5, 3, 4)
    assert all(torch.equal(sample, layer.weight) for sample in out)
    assert layer.weight.requires_grad
    assert not fl.Parameter(2, requires_grad=False).weight.requires_grad


def test_parameter_receives_gradients() -> None:
    layer = fl.Parameter(3)
    layer(torch.zeros(2, 1)).sum().backward()
    assert torch.equal(layer.weight.grad, torch.full((3,), 2.0))  # type: ignore[arg-type]


# Attention


def manual_attention(
    attention: fl.Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_heads: int,
    causal: bool = False,
) -> torch.Tensor:
    """Multi-head attention written out: projections, per-head softmax(q kᵀ/√d) v, merge, output projection."""
    q_proj, k_proj, v_proj = (at(attention, f"Distribute.Linear_{i}", fl.Linear) for i in (1, 2, 3))
    out_proj = at(attention, "Linear", fl.Linear)

    def project(linear: fl.Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)

    q, k, v = project(q_proj, query), project(k_proj, key), project(v_proj, value)
    batch, q_len, inner = q.shape
    head_dim = inner // num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], num_heads, head_dim).permute(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        mask = torch.ones(q_len, k.shape[1], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    attended = scores.softmax(dim=-1) @ heads(v)
    merged = attended.permute(0, 2, 1, 3).reshape(batch, q_len, inner)
    return project(out_proj, merged)


def test_attention_matches_a_manual_multi_head_attention() -> None:
    attention = fl.Attention(embedding_dim=16, num_heads=4)
    query, key, value = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    out = attention(query, key, value)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out, manual_attention(attention, query, key, value, 4), atol=1e-5, rtol=1e-5)


def test_attention_with_key_and_value_dims_other_than_the_embedding_dim() -> None:
    attention = fl.Attention(embedding_dim=16, num_heads=2, key_embedding_dim=6, value_embedding_dim=10, inner_dim=8)
    q_proj, k_proj, v_proj = (at(attention, f"Distribute.Linear_{i}", fl.Linear) for i in (1, 2, 3))
    assert (q_proj.in_features, k_proj.in_features, v_proj.in_features) == (16, 6, 10)
    assert (q_proj.out_features, k_proj.out_features, v_proj.out_features) == (8, 8, 8)
    out_proj = at(attention, "Linear", fl.Linear)
    assert out_proj.in_features == 8 and out_proj.out_features == 16
    query, key, value = torch.randn(2, 5, 16), torch.randn(2, 3, 6), torch.randn(2, 3, 10)
    out = attention(query, key, value)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out, manual_attention(attention, query, key, value, 2), atol=1e-5, rtol=1e-5)


def test_causal_attention_masks_future_positions() -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=2, is_causal=True)
    x = torch.randn(2, 6, 8)
    out = attention(x, x, x)
    torch.testing.assert_close(out, manual_attention(attention, x, x, x, 2, causal=True), atol=1e-5, rtol=1e-5)
    # The first position only attends to itself: changing later positions leaves it unchanged.
    changed = x.clone()
    changed[:, 3:] = torch.randn(2, 3, 8)
    assert torch.equal(attention(changed, changed, changed)[:, :3], out[:, :3])
    assert not torch.allclose(fl.Attention(8, num_heads=2)(x, x, x), out)


def test_attention_without_bias_has_bias_free_projections() -> None:
    attention = fl.Attention(embedding_dim=8, num_heads=2, use_bias=False)
    assert all(at(attention, f"Distribute.Linear_{i}", fl.Linear).bias is None for i in (1, 2, 3))
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(attention(x, x, x), manual_attention(attention, x, x, x, 2), atol=1e-5, rtol=1e-5)


def test_attention_rejects_an_inner_dim_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="num_heads=3"):
        fl.Attention(embedding_dim=8, num_heads=3)


def test_self_attention_uses_its_input_as_query_key_and_value() -> None:
    attention = fl.SelfAttention(embedding_dim=12, num_heads=3)
    x = torch.randn(2, 5, 12)
    expected = manual_attention(attention, x, x, x, 3)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
    assert attention["Distribute"].get_path() == "SelfAttention.Distribute"


def test_self_attention_positional_arguments_follow_refiners_order() -> None:
    # Refiners: SelfAttention(embedding_dim, inner_dim=None, num_heads=1, ...)
    attention = fl.SelfAttention(8, 16, 4)
    assert attention.inner_dim == 16 and attention.num_heads == 4


def test_self_attention_causal() -> None:
    attention = fl.SelfAttention(embedding_dim=8, num_heads=2, is_causal=True)
    x = torch.randn(1, 4, 8)
    expected = manual_attention(attention, x, x, x, 2, causal=True)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
