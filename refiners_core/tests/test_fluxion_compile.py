"""`torch.compile(model, fullgraph=True)` of a Fluxion model: no graph break, same outputs as eager.

`fullgraph=True` turns any graph break into an error. Tolerance against eager: atol 1e-5, float32, CPU. Only
the first test pays for an inductor compile; the others use the `aot_eager` and `eager` backends, which trace
the same graph (and fail on the same graph breaks) without generating code.
"""

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter


class LowRank(fl.Sum, Adapter[fl.Linear]):
    """A LoRA-like adapter defined here: `target(x) + up(down(x))`."""

    def __init__(self, target: fl.Linear, rank: int = 2) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target,
                fl.Chain(fl.Linear(target.in_features, rank, bias=False), fl.Linear(rank, target.out_features)),
            )


def build_model() -> fl.Chain:
    torch.manual_seed(0)
    model = fl.Chain(
        fl.Linear(8, 8),
        fl.Residual(fl.LayerNorm(8), fl.Chain(fl.Linear(8, 16), fl.SiLU(), fl.Linear(16, 8))),
        fl.Residual(
            fl.Parallel(fl.Identity(), fl.UseContext("cross", "embedding"), fl.UseContext("cross", "embedding")),
            fl.Attention(embedding_dim=8, num_heads=2, key_embedding_dim=6, value_embedding_dim=6),
        ),
        fl.Chain(
            fl.Parallel(fl.Identity(), fl.Multiply(2.0)),
            fl.Distribute(fl.Linear(8, 8), fl.GeLU()),
            fl.Lambda(torch.add),
        ),
        fl.Passthrough(fl.SetContext("cross", "last")),
    )
    attention = model.ensure_find(fl.Attention)
    for linear, parent in attention.walk(fl.Linear):
        LowRank(linear).inject(parent)  # type: ignore[arg-type]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)  # the adapters' up projections are not zero: they change the output
    return model


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # refiners_core.testing's fixture


def test_compiled_model_with_nested_chains_context_and_adapters_matches_eager() -> None:
    model = build_model()
    assert len(list(model.layers(LowRank))) == 4
    x = torch.randn(2, 5, 8)
    first, second = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        model.set_context("cross", {"embedding": first})
        expected_first = model(x)
        compiled_first = compiled(x)
        torch.testing.assert_close(compiled_first, expected_first, atol=1e-5, rtol=0)
        assert model.use_context("cross")["last"] is not None  # SetContext's side effect survives compilation
        torch.testing.assert_close(model.use_context("cross")["last"], compiled_first, atol=0, rtol=0)
        model.set_context("cross", {"embedding": second})
        expected_second = model(x)
        compiled_second = compiled(x)
    assert not torch.allclose(expected_first, expected_second)
    torch.testing.assert_close(compiled_second, expected_second, atol=1e-5, rtol=0)


def test_compiled_model_backward_matches_eager_gradients() -> None:
    model = build_model()
    model.set_context("cross", {"embedding": torch.randn(2, 3, 6)})
    x = torch.randn(2, 5, 8)
    model(x).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_a_graph_break_fails_under_fullgraph() -> None:
    class Breaks(fl.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._dynamo.graph_break()
            return x

    model = fl.Chain(fl.Linear(2, 2), Breaks())
    with pytest.raises(Exception):  # noqa: B017 - the exception type is a dynamo internal
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(1, 2))


def test_compiling_does_not_change_the_module_tree() -> None:
    model = build_model()
    model.set_context("cross", {"embedding": torch.randn(1, 3, 6)})
    keys = list(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert isinstance(compiled, nn.Module)
    compiled(torch.randn(1, 5, 8))
    assert list(model.state_dict()) == keys
