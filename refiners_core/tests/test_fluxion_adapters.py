"""The Adapter protocol (`refiners_core.fluxion.adapters.Adapter`) with small adapters defined here."""

import copy
import io
import itertools
from typing import TypeVar

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter, AdapterError

T = TypeVar("T", bound=fl.Module)


def at(chain: fl.Chain, path: str, kind: type[T]) -> T:
    """The layer at `path`, checked to be a `kind`."""
    layer = chain[path]
    assert isinstance(layer, kind), f"{path} is a {type(layer).__name__}, not a {kind.__name__}"
    return layer


class Scale(fl.Chain, Adapter[fl.Linear]):
    """Multiply the target's output by a constant (no weights of its own)."""

    def __init__(self, target: fl.Linear, factor: float = 2.0) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Multiply(factor))


class Shift(fl.Sum, Adapter[fl.Linear]):
    """Add a learned vector to the target's output (weights of its own)."""

    def __init__(self, target: fl.Linear) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Parameter(target.out_features))


class Model(fl.Chain):
    def __init__(self) -> None:
        super().__init__(
            fl.Linear(4, 4),
            fl.Chain(fl.Linear(4, 4), fl.SiLU(), fl.Linear(4, 4)),
            fl.Residual(fl.Linear(4, 4)),
        )


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model()


def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 4)


def snapshot(model: fl.Chain) -> tuple[list[str], list[torch.Tensor], list[tuple[str, nn.Module]]]:
    state = model.state_dict()
    return list(state), [t.clone() for t in state.values()], list(model.named_modules())


def assert_restored(model: fl.Chain, before: tuple[list[str], list[torch.Tensor], list[tuple[str, nn.Module]]]) -> None:
    keys, tensors, modules = before
    state = model.state_dict()
    assert list(state) == keys
    assert all(torch.equal(a, b) for a, b in zip(state.values(), tensors, strict=True))
    now = list(model.named_modules())
    assert [name for name, _ in now] == [name for name, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(now, modules, strict=True))


def test_inject_finds_the_target_parent_and_takes_its_place(model: Model) -> None:
    target = at(model, "Chain.Linear_1", fl.Linear)
    assert isinstance(target, fl.Linear)
    expected = model(x())
    adapter = Scale(target, 3.0)
    assert adapter.inject() is adapter
    assert adapter.is_injected
    assert at(model, "Chain", fl.Chain)[0] is adapter
    assert adapter.parent is at(model, "Chain", fl.Chain)
    assert target.parent is adapter
    assert adapter.target is target
    assert not torch.allclose(model(x()), expected)
    manual = model["Chain.Linear_2"](fl.SiLU()(3 * target(model["Linear"](x()))))
    assert torch.equal(model["Chain"](model["Linear"](x())), manual)


def test_inject_into_an_explicit_parent(model: Model) -> None:
    target = at(model, "Residual.Linear", fl.Linear)
    adapter = Scale(target).inject(at(model, "Residual", fl.Chain))
    assert model["Residual.Linear"] is adapter
    assert adapter.get_path() == "Model.Residual.Linear"
    assert target.get_path() == "Model.Residual.Linear.Linear"


def test_injecting_an_adapter_does_not_rename_siblings(model: Model) -> None:
    names = list(dict(at(model, "Chain", fl.Chain).named_children()))
    adapter = Scale(at(model, "Chain.Linear_1", fl.Linear)).inject()
    assert list(dict(at(model, "Chain", fl.Chain).named_children())) == names == ["Linear_1", "SiLU", "Linear_2"]
    assert model["Chain.Linear_1"] is adapter
    assert model["Chain.Linear_2"].get_path() == "Model.Chain.Linear_2"


def test_adapter_weights_appear_under_the_target_name(model: Model) -> None:
    adapter = Shift(at(model, "Chain.Linear_2", fl.Linear)).inject()
    keys = list(model.state_dict())
    assert "Chain.Linear_2.Linear.weight" in keys
    assert "Chain.Linear_2.Parameter.weight" in keys
    assert "Chain.Linear_2.weight" not in keys
    assert model["Chain.Linear_2.Parameter"] is adapter["Parameter"]


def test_eject_restores_state_dict_outputs_and_the_target_object(model: Model) -> None:
    before = snapshot(model)
    expected = model(x())
    target = at(model, "Chain.Linear_2", fl.Linear)
    adapter = Shift(target).inject()
    assert not torch.allclose(model(x()), expected)
    adapter.eject()
    assert not adapter.is_injected
    assert model["Chain.Linear_2"] is target
    assert target.parent is at(model, "Chain", fl.Chain)
    assert adapter.parent is None
    assert target.get_path() == "Model.Chain.Linear_2"
    assert_restored(model, before)
    assert torch.equal(model(x()), expected)


def test_injecting_twice_raises_naming_the_adapter_and_the_layer_path(model: Model) -> None:
    adapter = Scale(at(model, "Chain.Linear_1", fl.Linear)).inject()
    with pytest.raises(AdapterError) as info:
        adapter.inject()
    assert "Scale" in str(info.value)
    assert "Model.Chain.Linear_1" in str(info.value)


def test_ejecting_an_adapter_that_is_not_injected_raises(model: Model) -> None:
    adapter = Scale(at(model, "Chain.Linear_1", fl.Linear))
    with pytest.raises(AdapterError, match="Scale"):
        adapter.eject()
    adapter.inject()
    adapter.eject()
    with pytest.raises(AdapterError, match="not injected"):
        adapter.eject()


def test_injecting_into_a_parent_without_the_target_raises_naming_adapter_and_path(model: Model) -> None:
    before = snapshot(model)
    adapter = Scale(at(model, "Chain.Linear_1", fl.Linear))
    with pytest.raises(AdapterError) as info:
        adapter.inject(at(model, "Residual", fl.Chain))
    message = str(info.value)
    assert "Scale" in message
    assert "Model.Residual" in message
    assert "Model.Chain.Linear_1" in message
    assert not adapter.is_injected
    assert_restored(model, before)


def test_a_target_without_parent_asks_for_an_explicit_parent() -> None:
    adapter = Scale(fl.Linear(2, 2))
    with pytest.raises(AdapterError, match=r"inject\(parent\)"):
        adapter.inject()


def test_adapting_a_plain_torch_module_raises_type_error() -> None:
    with pytest.raises(TypeError, match="Scale"):
        Scale(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_building_an_adapter_does_not_modify_the_model(model: Model) -> None:
    before = snapshot(model)
    expected = model(x())
    target = at(model, "Chain.Linear_1", fl.Linear)
    Shift(target)
    Scale(target)
    assert target.parent is at(model, "Chain", fl.Chain)
    assert target.parents == (at(model, "Chain", fl.Chain),)
    assert target.get_path() == "Model.Chain.Linear_1"
    assert_restored(model, before)
    assert torch.equal(model(x()), expected)


def test_the_adapter_works_before_injection() -> None:
    target = fl.Linear(4, 4)
    adapter = Scale(target, 5.0)
    assert torch.equal(adapter(x()), 5 * target(x()))


@pytest.mark.parametrize("eject_order", ["inner_first", "outer_first"])
def test_two_adapters_on_one_target_eject_in_any_order(model: Model, eject_order: str) -> None:
    before = snapshot(model)
    expected = model(x())
    target = at(model, "Chain.Linear_1", fl.Linear)
    first = Shift(target).inject()
    second = Scale(target, 3.0).inject()
    with torch.no_grad():
        both = model["Chain.Linear_2"](fl.SiLU()(3 * target(model["Linear"](x())) + first["Parameter"](x())))
        assert torch.allclose(model["Chain"](model["Linear"](x())), both)
    if eject_order == "inner_first":
        second.eject()
        assert model["Chain.Linear_1"] is first
        first.eject()
    else:
        first.eject()
        assert model["Chain.Linear_1"] is second
        assert second.target is target
        second.eject()
    assert not first.is_injected and not second.is_injected
    assert model["Chain.Linear_1"] is target
    assert target.parents == (at(model, "Chain", fl.Chain),)
    assert_restored(model, before)
    assert torch.equal(model(x()), expected)


def test_an_adapter_can_be_injected_again_after_eject(model: Model) -> None:
    before = snapshot(model)
    adapter = Shift(at(model, "Residual.Linear", fl.Linear))
    adapter.inject()
    adapted = model(x())
    adapter.eject()
    adapter.inject()
    assert model["Residual.Linear"] is adapter
    assert torch.equal(model(x()), adapted)
    adapter.eject()
    assert_restored(model, before)


def test_ejecting_after_the_model_was_edited_raises(model: Model) -> None:
    adapter = Scale(at(model, "Chain.Linear_1", fl.Linear)).inject()
    at(model, "Chain", fl.Chain).remove(adapter)
    with pytest.raises(AdapterError, match="no longer a child"):
        adapter.eject()


def test_injecting_into_every_linear_while_walking(model: Model) -> None:
    before = snapshot(model)
    adapters = [Shift(linear).inject(parent) for linear, parent in model.walk(fl.Linear)]  # type: ignore[arg-type]
    assert len(adapters) == 4
    assert len(list(model.layers(Shift))) == 4
    assert list(dict(at(model, "Chain", fl.Chain).named_children())) == ["Linear_1", "SiLU", "Linear_2"]
    for adapter in reversed(adapters):
        adapter.eject()
    assert_restored(model, before)


def test_to_float64_moves_injected_adapter_weights(model: Model) -> None:
    adapter = Shift(at(model, "Chain.Linear_1", fl.Linear)).inject()
    model.to(dtype=torch.float64)
    assert at(adapter, "Parameter", fl.Parameter).weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    adapter.eject()
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_structural_copy_isolates_adapters_injected_into_the_copy(model: Model) -> None:
    before = snapshot(model)
    expected = model(x())
    clone = model.structural_copy()
    adapters = [Shift(linear).inject(parent) for linear, parent in clone.walk(fl.Linear)]  # type: ignore[arg-type]
    assert len(list(clone.layers(Shift))) == 4
    assert not list(model.layers(Shift))
    assert_restored(model, before)
    assert torch.equal(model(x()), expected)
    assert not torch.allclose(clone(x()), expected)
    for adapter in adapters:
        adapter.eject()
    assert torch.equal(clone(x()), expected)
    assert all(linear.parent is parent for linear, parent in model.walk(fl.Linear))


def test_eject_keeps_the_original_parent_of_a_layer_shared_with_a_structural_copy(model: Model) -> None:
    clone = model.structural_copy()
    target = at(model, "Chain.Linear_1", fl.Linear)
    assert target.parent is at(model, "Chain", fl.Chain)
    adapter = Scale(target).inject(at(model, "Chain", fl.Chain))
    adapter.eject()
    assert target.parent is at(model, "Chain", fl.Chain)
    assert target.parents == (at(model, "Chain", fl.Chain), at(clone, "Chain", fl.Chain))


def test_structural_copy_of_an_adapted_model_can_eject_its_own_adapter(model: Model) -> None:
    expected = model(x())
    adapter = Shift(at(model, "Chain.Linear_1", fl.Linear)).inject()
    adapted = model(x())
    clone = model.structural_copy()
    clone_adapter = clone["Chain.Linear_1"]
    assert isinstance(clone_adapter, Shift) and clone_adapter is not adapter
    clone_adapter.eject()
    assert isinstance(clone["Chain.Linear_1"], fl.Linear)
    assert torch.equal(clone(x()), expected)
    assert model["Chain.Linear_1"] is adapter and adapter.is_injected
    assert torch.equal(model(x()), adapted)


def test_deepcopy_of_an_adapted_model_can_eject_the_copied_adapter(model: Model) -> None:
    expected = model(x())
    adapter = Shift(at(model, "Chain.Linear_1", fl.Linear)).inject()
    adapted = model(x())
    clone = copy.deepcopy(model)
    clone_adapter = clone["Chain.Linear_1"]
    assert isinstance(clone_adapter, Shift) and clone_adapter.is_injected
    assert clone_adapter.target is clone["Chain.Linear_1.Linear"]
    clone_adapter.eject()
    assert torch.equal(clone(x()), expected)
    assert adapter.is_injected and torch.equal(model(x()), adapted)


def test_pickled_adapted_model_can_eject_after_loading(model: Model) -> None:
    expected = model(x())
    Shift(at(model, "Chain.Linear_1", fl.Linear)).inject()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded_adapter = loaded["Chain.Linear_1"]
    assert isinstance(loaded_adapter, Shift) and loaded_adapter.is_injected
    loaded_adapter.eject()
    assert torch.equal(loaded(x()), expected)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda order: "-".join(map(str, order)))
def test_three_adapters_on_one_target_eject_in_any_order(model: Model, order: tuple[int, ...]) -> None:
    before = snapshot(model)
    expected = model(x())
    target = at(model, "Chain.Linear_1", fl.Linear)
    adapters: list[Scale | Shift] = [Shift(target).inject(), Scale(target, 3.0).inject(), Shift(target).inject()]
    assert len(list(model.layers(Shift, recurse=True))) == 2 and len(list(model.layers(Scale))) == 1
    for index in order:
        adapters[index].eject()
        remaining = [adapter for adapter in adapters if adapter.is_injected]
        assert all(adapter.get_path().startswith("Model.Chain.Linear_1") for adapter in remaining)
        assert len(list(model.layers(Shift, recurse=True))) + len(list(model.layers(Scale))) == len(remaining)
    assert model["Chain.Linear_1"] is target
    assert target.parents == (at(model, "Chain", fl.Chain),)
    assert_restored(model, before)
    assert torch.equal(model(x()), expected)


class Gate(fl.Chain, Adapter[fl.Chain]):
    """An adapter around a whole sub-chain: multiply its output by a value read from the context."""

    def __init__(self, target: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__(
                fl.Parallel(target, fl.UseContext("gate", "value")),
                fl.Lambda(torch.mul),
            )


def test_an_adapter_whose_target_sits_in_a_nested_chain_injects_and_ejects() -> None:
    inner = fl.Chain(fl.Sum(fl.Identity(), fl.UseContext("shift", "value")))
    model = fl.Chain(fl.Linear(2, 2), inner)
    model.set_context("shift", {"value": torch.ones(1)})
    model.set_context("gate", {"value": torch.full((1,), 3.0)})
    before = snapshot(model)
    h = torch.randn(1, 2)
    expected = model(h)
    adapter = Gate(inner).inject()
    assert model["Chain"] is adapter
    assert torch.allclose(model(h), 3 * expected)  # the target still reads the model's contexts
    assert inner.get_path() == "Chain.Chain.Parallel.Chain"
    assert inner["Sum.UseContext"].get_path() == "Chain.Chain.Parallel.Chain.Sum.UseContext"
    adapter.eject()
    assert model["Chain"] is inner
    assert inner.get_path() == "Chain.Chain"
    assert_restored(model, before)
    assert torch.equal(model(h), expected)


class Prepend(fl.Module, Adapter[fl.Chain]):
    """Patch the target chain in place: put a layer first in it (as the UNet adapters do)."""

    def __init__(self, target: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__()
        self.layer = fl.Multiply(2.0)

    @property
    def is_injected(self) -> bool:
        return any(layer is self.layer for layer in self.target)

    def inject(self, parent: fl.Chain | None = None) -> "Prepend":
        self.check_in_place_injection(parent, "chain")
        self.target.insert(0, self.layer)
        return self


def test_an_in_place_adapter_refuses_another_parent_and_a_second_injection(model: Model) -> None:
    target = at(model, "Chain", fl.Chain)
    adapter = Prepend(target)
    with pytest.raises(
        AdapterError, match="^Prepend patches the chain at `Model.Chain` in place: it cannot be injected into `Model`$"
    ):
        adapter.inject(model)
    assert not adapter.is_injected
    adapter.inject(target)
    with pytest.raises(AdapterError, match="^this Prepend is already injected into `Model.Chain`$"):
        adapter.inject()
    assert sum(layer is adapter.layer for layer in target) == 1
