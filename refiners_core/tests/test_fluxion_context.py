"""The Context API: `set_context`, `use_context`, `SetContext`, `UseContext` and chains' default contexts."""

import copy
from typing import Any

import pytest
import torch

import refiners_core.fluxion as fl


class WithDefaults(fl.Chain):
    def init_context(self) -> fl.Contexts:
        return {"sampling": {"shapes": []}, "diffusion": {"timestep": torch.tensor(7.0)}}


def test_a_nested_layer_reads_the_context_set_on_the_root() -> None:
    model = fl.Chain(fl.Chain(fl.Chain(fl.UseContext("diffusion", "timestep"))))
    t = torch.tensor([3.0])
    model.set_context("diffusion", {"timestep": t})
    assert model(torch.zeros(1)) is t


def test_set_context_on_a_nested_chain_writes_to_the_model_contexts() -> None:
    inner = fl.Chain(fl.UseContext("ctx", "value"))
    model = fl.Chain(fl.Chain(inner), fl.Multiply(2.0))
    inner.set_context("ctx", {"value": torch.ones(1)})
    assert model.use_context("ctx")["value"].item() == 1.0
    assert model(torch.zeros(1)).item() == 2.0


def test_set_context_updates_the_keys_it_is_given() -> None:
    model = fl.Chain(fl.Identity())
    model.set_context("ctx", {"a": 1})
    model.set_context("ctx", {"b": 2})
    model.set_context("ctx", {"a": 3})
    assert model.use_context("ctx") == {"a": 3, "b": 2}


def test_init_context_gives_defaults_that_reach_the_model_it_joins() -> None:
    block = WithDefaults(fl.UseContext("diffusion", "timestep"))
    model = fl.Chain(fl.Chain(block))
    assert model.use_context("diffusion")["timestep"].item() == 7.0
    assert model(torch.zeros(1)).item() == 7.0
    model.set_context("diffusion", {"timestep": torch.tensor(9.0)})
    assert block(torch.zeros(1)).item() == 9.0  # the block reads the model's contexts now


def test_values_set_on_the_model_win_over_defaults_of_a_chain_that_joins_later() -> None:
    model = fl.Chain(fl.Identity())
    model.set_context("diffusion", {"timestep": torch.tensor(1.0)})
    model.append(WithDefaults(fl.UseContext("diffusion", "timestep")))
    assert model(torch.zeros(1)).item() == 1.0
    assert model.use_context("sampling") == {"shapes": []}


def test_contexts_set_on_a_chain_before_it_joins_a_model_are_kept() -> None:
    part = fl.Chain(fl.UseContext("ctx", "value"))
    part.set_context("ctx", {"value": torch.tensor(5.0)})
    model = fl.Chain(fl.Identity(), part)
    assert model(torch.zeros(1)).item() == 5.0


def test_set_context_layer_stores_its_input_and_passes_it_on() -> None:
    model = fl.Chain(fl.Multiply(2.0), fl.SetContext("store", "x"), fl.Multiply(3.0))
    model.set_context("store", {})
    x = torch.ones(2)
    assert torch.equal(model(x), 6 * x)
    assert torch.equal(model.use_context("store")["x"], 2 * x)


def test_set_context_layer_with_a_callback_hands_it_the_current_value_and_the_input() -> None:
    calls: list[tuple[Any, Any]] = []

    def record(current: list[torch.Size], x: torch.Tensor) -> None:
        calls.append((current, x))
        current.append(x.shape)

    model = fl.Chain(fl.SetContext("sampling", "shapes", callback=record), fl.Multiply(2.0))
    shapes: list[torch.Size] = []
    model.set_context("sampling", {"shapes": shapes})
    x = torch.ones(2, 3)
    assert torch.equal(model(x), 2 * x)
    assert len(calls) == 1 and calls[0][0] is shapes and calls[0][1] is x
    assert model.use_context("sampling")["shapes"] == [torch.Size([2, 3])]


def test_set_context_and_use_context_carry_data_across_branches() -> None:
    model = fl.Chain(
        fl.Passthrough(fl.Multiply(10.0), fl.SetContext("skip", "feature")),
        fl.Multiply(2.0),
        fl.Sum(fl.Identity(), fl.UseContext("skip", "feature")),
    )
    model.set_context("skip", {})
    x = torch.ones(1)
    assert model(x).item() == 2.0 + 10.0


def test_use_context_layer_error_for_a_missing_context_names_context_and_path() -> None:
    model = fl.Chain(fl.Chain(fl.UseContext("ctx", "value")))
    with pytest.raises(fl.ContextError) as info:
        model(torch.zeros(1))
    assert isinstance(info.value, LookupError)
    assert "'ctx'" in str(info.value)
    assert "Chain.Chain.UseContext" in str(info.value)


def test_use_context_layer_error_for_a_missing_key_names_context_key_and_path() -> None:
    model = fl.Chain(fl.Chain(fl.UseContext("ctx", "value")))
    model.set_context("ctx", {"other": 1})
    with pytest.raises(fl.ContextError) as info:
        model(torch.zeros(1))
    message = str(info.value)
    assert "'ctx'" in message and "'value'" in message and "Chain.Chain.UseContext" in message
    assert "other" in message  # the keys that are set


def test_use_context_outside_any_chain_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match="UseContext"):
        fl.UseContext("ctx", "value")(torch.zeros(1))


def test_structural_copy_has_its_own_contexts() -> None:
    model = fl.Chain(fl.UseContext("ctx", "value"))
    model.set_context("ctx", {"value": torch.tensor(1.0)})
    clone = model.structural_copy()
    clone.set_context("ctx", {"value": torch.tensor(2.0)})
    assert model(torch.zeros(1)).item() == 1.0
    assert clone(torch.zeros(1)).item() == 2.0


def test_deepcopy_copies_contexts_independently() -> None:
    model = fl.Chain(fl.UseContext("ctx", "value"))
    model.set_context("ctx", {"value": 1})
    clone = copy.deepcopy(model)
    clone.set_context("ctx", {"value": 2})
    assert model(torch.zeros(1)) == 1
    assert clone(torch.zeros(1)) == 2


def test_structural_copy_does_not_share_mutable_context_values() -> None:
    def record(shapes: list[torch.Size], x: torch.Tensor) -> None:
        shapes.append(x.shape)

    model = WithDefaults(fl.SetContext("sampling", "shapes", callback=record), fl.Identity())
    clone = model.structural_copy()
    clone(torch.zeros(2, 3))
    assert clone.use_context("sampling")["shapes"] == [torch.Size([2, 3])]
    assert model.use_context("sampling")["shapes"] == []
