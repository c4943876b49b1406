"""`Chain`: a real `nn.Module` (state_dict, dtype moves, copies, pickling) and the tree API of Refiners."""

import copy
import io
from collections.abc import Iterator
from typing import TypeVar

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl

T = TypeVar("T", bound=fl.Module)


def at(chain: fl.Chain, path: str, kind: type[T]) -> T:
    """The layer at `path`, checked to be a `kind`."""
    layer = chain[path]
    assert isinstance(layer, kind), f"{path} is a {type(layer).__name__}, not a {kind.__name__}"
    return layer


class Block(fl.Chain):
    def __init__(self, dim: int) -> None:
        super().__init__(
            fl.LayerNorm(dim),
            fl.Residual(fl.SelfAttention(dim, num_heads=2)),
            fl.Residual(fl.Linear(dim, 2 * dim), fl.GeLU(), fl.Linear(2 * dim, dim)),
        )


class Model(fl.Chain):
    def __init__(self, dim: int = 8) -> None:
        super().__init__(
            fl.Linear(dim, dim),
            Block(dim),
            Block(dim),
            fl.Unsqueeze(-1),
            fl.Transpose(1, 2),
            fl.LayerNorm2d(dim),
        )
        self.register_buffer("counter", torch.arange(3, dtype=torch.float32))


def model_input() -> torch.Tensor:
    return torch.randn(2, 5, 8)


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model()


def test_model_forward_shape(model: Model) -> None:
    assert model(model_input()).shape == (2, 8, 5, 1)


# A real nn.Module


def test_state_dict_round_trip_into_a_fresh_model_gives_identical_outputs(model: Model) -> None:
    x = model_input()
    torch.manual_seed(123)
    fresh = Model()
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_state_dict_keys_are_layer_paths(model: Model) -> None:
    keys = list(model.state_dict())
    assert "Block_1.Residual_1.SelfAttention.Distribute.Linear_1.weight" in keys
    assert "Block_2.Residual_2.Linear_2.bias" in keys
    assert "LayerNorm2d.weight" in keys
    assert "counter" in keys


def test_to_float64_moves_every_parameter_and_buffer(model: Model) -> None:
    model.to(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for b in model.buffers())
    assert model.dtype == torch.float64
    assert model(model_input().double()).dtype == torch.float64


def test_parameters_lists_every_layer_weight_once(model: Model) -> None:
    parameters = list(model.parameters())
    assert len({id(p) for p in parameters}) == len(parameters)
    block = 2 * 8 + 4 * (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8)
    assert sum(p.numel() for p in parameters) == (8 * 8 + 8) + 2 * block + 2 * 8


def test_deepcopy_of_a_model_is_independent_and_equal(model: Model) -> None:
    x = model_input()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        clone[0].weight.add_(1.0)  # type: ignore[union-attr]
    assert not torch.equal(clone(x), model(x))
    assert clone["Block_1.Residual_1"].get_path() == "Model.Block_1.Residual_1"
    assert clone["Block_1.Residual_1"].root is clone


def test_deepcopy_of_a_sub_chain_does_not_drag_the_model_along(model: Model) -> None:
    block = at(model, "Block_2", fl.Chain)
    clone = copy.deepcopy(block)
    assert clone.root is clone
    assert clone.parent is None
    assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in block.parameters())
    assert clone["Residual_1.SelfAttention"].get_path() == "Block.Residual_1.SelfAttention"
    assert block.root is model  # the original keeps its place
    x = torch.randn(2, 5, 8)
    assert torch.equal(clone(x), block(x))


def test_torch_save_and_load_of_a_whole_model(model: Model) -> None:
    x = model_input()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is Model
    assert torch.equal(loaded(x), model(x))
    assert loaded["Block_2.Residual_2.Linear_1"].get_path() == "Model.Block_2.Residual_2.Linear_1"


def test_train_and_eval_reach_nested_layers(model: Model) -> None:
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


# Reading the tree


def test_find_returns_the_first_layer_of_a_type_depth_first(model: Model) -> None:
    assert model.find(fl.SelfAttention) is model["Block_1.Residual_1.SelfAttention"]
    assert model.find(fl.Conv2d) is None


def test_ensure_find_raises_naming_the_missing_type(model: Model) -> None:
    assert model.ensure_find(fl.GeLU) is model["Block_1.Residual_2.GeLU"]
    with pytest.raises(LookupError, match="Conv2d"):
        model.ensure_find(fl.Conv2d)


def test_layers_yields_nested_layers_in_depth_first_order(model: Model) -> None:
    norms = list(model.layers(fl.LayerNorm))
    assert norms == [model["Block_1.LayerNorm"], model["Block_2.LayerNorm"]]
    assert len(list(model.layers(fl.Linear))) == 1 + 2 * (4 + 2)


def test_layers_does_not_look_inside_matching_layers_unless_recurse_as_in_refiners(model: Model) -> None:
    outer = list(model.layers(fl.Residual))
    assert outer == [
        model["Block_1.Residual_1"],
        model["Block_1.Residual_2"],
        model["Block_2.Residual_1"],
        model["Block_2.Residual_2"],
    ]
    assert list(model.layers(fl.Chain)) == [model["Block_1"], model["Block_2"]]
    every = list(model.layers(fl.Chain, recurse=True))
    assert model["Block_1.Residual_1.SelfAttention"] in every
    assert len(every) == len([layer for layer in model.modules() if isinstance(layer, fl.Chain)]) - 1


def test_walk_with_a_type_stops_at_matches_unless_recurse(model: Model) -> None:
    residuals = list(model.walk(fl.Residual))
    assert [parent for _, parent in residuals] == [
        at(model, "Block_1", fl.Chain),
        at(model, "Block_1", fl.Chain),
        at(model, "Block_2", fl.Chain),
        at(model, "Block_2", fl.Chain),
    ]
    # SelfAttention (a Residual's child) is never yielded: the walk does not enter a matching Residual
    assert [layer for layer, _ in model.walk(fl.Chain)] == [
        at(model, "Block_1", fl.Chain),
        at(model, "Block_2", fl.Chain),
    ]
    nested = [layer for layer, _ in model.walk(fl.Chain, recurse=True)]
    assert model["Block_1.Residual_1.SelfAttention.Distribute"] in nested


def test_walk_with_a_predicate_receives_layer_and_parent(model: Model) -> None:
    seen: list[tuple[str, str]] = []

    def second_linear_of_an_mlp(layer: fl.Module, parent: fl.Chain) -> bool:
        seen.append((type(layer).__name__, type(parent).__name__))
        return isinstance(layer, fl.Linear) and isinstance(parent, fl.Residual) and parent.name_of(layer) == "Linear_2"

    found = list(model.walk(second_linear_of_an_mlp))
    assert found == [
        (model["Block_1.Residual_2.Linear_2"], model["Block_1.Residual_2"]),
        (model["Block_2.Residual_2.Linear_2"], model["Block_2.Residual_2"]),
    ]
    assert ("Linear", "Model") in seen
    assert ("GeLU", "Residual") in seen


def test_walk_without_predicate_yields_every_layer(model: Model) -> None:
    assert len(list(model.walk(recurse=True))) == len(list(model.modules())) - 1


def test_integer_indexing_follows_layer_order(model: Model) -> None:
    assert isinstance(model[0], fl.Linear)
    assert isinstance(model[-1], fl.LayerNorm2d)
    assert model[1] is at(model, "Block_1", fl.Chain)


def test_path_lookup_walks_nested_chains(model: Model) -> None:
    attention = model["Block_2.Residual_1.SelfAttention"]
    assert isinstance(attention, fl.SelfAttention)
    assert at(model, "Block_2", fl.Chain)["Residual_1.SelfAttention"] is attention


def test_path_lookup_error_names_the_chain_the_missing_name_and_the_known_names(model: Model) -> None:
    with pytest.raises(KeyError) as info:
        model["Block_1.Residual_3.Linear"]
    message = str(info.value)
    assert "Model.Block_1" in message
    assert "Residual_3" in message
    assert "Residual_1" in message and "Residual_2" in message


def test_path_lookup_through_a_leaf_raises_key_error(model: Model) -> None:
    with pytest.raises(KeyError, match="weight"):
        model["Linear.weight"]


def test_device_and_dtype_follow_the_weights(model: Model) -> None:
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    model.to(dtype=torch.float64)
    assert model.dtype == torch.float64
    assert at(model, "Block_1", fl.Chain).dtype == torch.float64


def test_device_and_dtype_of_a_layer_without_weights_fall_back_to_defaults() -> None:
    assert fl.Chain(fl.SiLU()).device == torch.device("cpu")
    assert fl.Chain(fl.SiLU()).dtype == torch.get_default_dtype()


def test_get_path_names_every_chain_from_the_root(model: Model) -> None:
    linear = model["Block_1.Residual_1.SelfAttention.Distribute.Linear_1"]
    assert linear.get_path() == "Model.Block_1.Residual_1.SelfAttention.Distribute.Linear_1"
    assert linear.get_path(top=at(model, "Block_1", fl.Chain)) == "Residual_1.SelfAttention.Distribute.Linear_1"
    assert model.get_path() == "Model"
    assert fl.Linear(2, 2).get_path() == "Linear"


def test_get_path_relative_to_a_layer_outside_raises(model: Model) -> None:
    with pytest.raises(ValueError, match="Block_1"):
        model["Block_1.LayerNorm"].get_path(top=at(model, "Block_2", fl.Chain))


# Naming


def test_lone_layers_keep_the_class_name_and_repeated_ones_are_numbered() -> None:
    chain = fl.Chain(fl.Linear(1, 1), fl.SiLU(), fl.Linear(1, 1), fl.Linear(1, 1), fl.ReLU())
    assert list(dict(chain.named_children())) == ["Linear_1", "SiLU", "Linear_2", "Linear_3", "ReLU"]


def test_names_regenerate_on_append_and_pop() -> None:
    chain = fl.Chain(fl.Linear(1, 1), fl.SiLU())
    assert list(dict(chain.named_children())) == ["Linear", "SiLU"]
    chain.append(fl.Linear(1, 1))
    assert list(dict(chain.named_children())) == ["Linear_1", "SiLU", "Linear_2"]
    chain.pop()
    assert list(dict(chain.named_children())) == ["Linear", "SiLU"]
    assert chain["Linear"].get_path() == "Chain.Linear"


def test_chain_subclasses_are_named_after_their_own_class(model: Model) -> None:
    assert list(dict(model.named_children()))[:3] == ["Linear", "Block_1", "Block_2"]


# Editing the tree


def small_chain() -> fl.Chain:
    return fl.Chain(fl.Linear(2, 2), fl.SiLU(), fl.Linear(2, 2))


def test_insert_at_a_positive_index_puts_the_layer_before_it() -> None:
    chain = small_chain()
    relu = fl.ReLU()
    chain.insert(1, relu)
    assert list(chain)[1] is relu
    assert relu.parent is chain
    assert relu.get_path() == "Chain.ReLU"


def test_insert_at_a_negative_index_counts_from_the_end_like_refiners() -> None:
    # Refiners' `Chain.insert(-1, x)` appends, `insert(-2, x)` goes before the last layer.
    chain = small_chain()
    last, before_last = fl.ReLU(), fl.Sigmoid()
    chain.insert(-1, last)
    chain.insert(-2, before_last)
    assert [type(layer) for layer in chain] == [fl.Linear, fl.SiLU, fl.Linear, fl.Sigmoid, fl.ReLU]


def test_append_adds_at_the_end_and_links_the_parent() -> None:
    chain = small_chain()
    relu = fl.ReLU()
    chain.append(relu)
    assert chain[-1] is relu
    assert relu.parent is chain


def test_pop_returns_the_layer_and_unlinks_it() -> None:
    chain = small_chain()
    first = chain[0]
    assert chain.pop(0) is first
    assert first.parent is None
    assert len(chain) == 2
    with pytest.raises(IndexError):
        chain.pop(5)


def test_replace_swaps_a_child_in_place() -> None:
    chain = small_chain()
    old, new = chain[1], fl.ReLU()
    chain.replace(old, new)
    assert list(chain)[1] is new
    assert new.parent is chain
    assert old.parent is None
    with pytest.raises(ValueError, match="Chain"):
        chain.replace(fl.Sigmoid(), fl.ReLU())


def test_remove_drops_a_child() -> None:
    chain = small_chain()
    silu = chain[1]
    chain.remove(silu)
    assert [type(layer) for layer in chain] == [fl.Linear, fl.Linear]
    assert silu.parent is None
    with pytest.raises(ValueError):
        chain.remove(silu)


def test_insert_before_and_after_type_use_the_first_child_of_that_type() -> None:
    chain = small_chain()
    before, after = fl.ReLU(), fl.Sigmoid()
    chain.insert_before_type(fl.SiLU, before)
    chain.insert_after_type(fl.Linear, after)
    assert [type(layer) for layer in chain] == [fl.Linear, fl.Sigmoid, fl.ReLU, fl.SiLU, fl.Linear]
    with pytest.raises(LookupError, match="Conv2d"):
        chain.insert_before_type(fl.Conv2d, fl.ReLU())


def test_edits_change_what_the_chain_computes() -> None:
    chain = fl.Chain(fl.Multiply(2.0))
    x = torch.ones(1)
    chain.append(fl.Multiply(3.0))
    assert chain(x).item() == 6.0
    chain.insert(0, fl.Multiply(bias=1.0))
    assert chain(x).item() == 12.0


def test_structural_copy_shares_weights_but_not_structure(model: Model) -> None:
    x = model_input()
    clone = model.structural_copy()
    assert clone is not model
    assert at(clone, "Block_1", fl.Chain) is not at(model, "Block_1", fl.Chain)
    assert clone["Block_1.Residual_2.Linear_1"] is model["Block_1.Residual_2.Linear_1"]  # weights shared
    assert torch.equal(clone(x), model(x))
    at(clone, "Block_1", fl.Chain).pop()
    assert len(at(model, "Block_1", fl.Chain)) == 3
    assert "Block_1.Residual_2.Linear_1.weight" in model.state_dict()


def test_structural_copy_keeps_the_buffers_of_a_chain(model: Model) -> None:
    clone = model.structural_copy()
    assert torch.equal(clone.counter, model.counter)  # type: ignore[arg-type]
    assert list(clone.state_dict()) == list(model.state_dict())


def test_structural_copy_shares_the_weight_tensors(model: Model) -> None:
    clone = model.structural_copy()
    with torch.no_grad():
        model[0].weight.zero_()  # type: ignore[union-attr]
    assert torch.equal(clone[0].weight, torch.zeros(8, 8))  # type: ignore[arg-type]


# Errors


class Broken(fl.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def notes(error: BaseException) -> list[str]:
    return list(getattr(error, "__notes__", []))


def test_a_failing_layer_gets_one_note_naming_its_path_and_input_shapes() -> None:
    model = fl.Chain(fl.Linear(4, 4), fl.Chain(fl.SiLU(), fl.Chain(fl.Linear(4, 4), fl.Linear(5, 4))))
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(3, 4))
    assert len(notes(info.value)) == 1
    note = notes(info.value)[0]
    assert "Chain.Chain.Chain.Linear_2" in note
    assert "(3, 4)" in note
    assert "float32" in note


def test_the_error_note_shows_every_input_of_a_multi_input_layer() -> None:
    model = fl.Chain(fl.Chain(fl.Parallel(fl.Identity(), fl.Unsqueeze(0)), fl.Lambda(torch.mm)))
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(3, 4))
    (note,) = notes(info.value)
    assert "Chain.Chain.Lambda" in note
    assert "(3, 4)" in note and "(1, 3, 4)" in note


@pytest.mark.parametrize(
    ("combinator", "inner_path"),
    [
        (fl.Parallel, "Chain.Parallel.Broken"),
        (fl.Sum, "Chain.Sum.Broken"),
        (fl.Concatenate, "Chain.Concatenate.Broken"),
    ],
)
def test_a_layer_failing_inside_a_combinator_is_named_in_the_note(combinator: type[fl.Chain], inner_path: str) -> None:
    model = fl.Chain(combinator(fl.Identity(), Broken()))
    with pytest.raises(RuntimeError, match="boom") as info:
        model(torch.randn(3, 4))
    assert any(inner_path in note for note in notes(info.value)), notes(info.value)


def test_a_layer_failing_inside_distribute_is_named_in_the_note() -> None:
    model = fl.Chain(fl.Parallel(fl.Identity(), fl.Identity()), fl.Distribute(fl.Linear(4, 4), fl.Linear(5, 4)))
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(3, 4))
    assert any("Chain.Distribute.Linear_2" in note for note in notes(info.value)), notes(info.value)


def test_an_attention_projection_with_the_wrong_size_is_named_in_the_note() -> None:
    model = fl.Chain(fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()), fl.Attention(8, key_embedding_dim=6))
    with pytest.raises(RuntimeError) as info:
        model(torch.randn(1, 3, 8))
    assert any("Attention.Distribute.Linear_2" in note for note in notes(info.value)), notes(info.value)


def test_chain_refuses_a_plain_torch_module_naming_it() -> None:
    with pytest.raises(TypeError, match="Linear"):
        fl.Chain(fl.SiLU(), nn.Linear(2, 2))  # type: ignore[arg-type]
    chain = fl.Chain(fl.SiLU())
    with pytest.raises(TypeError, match="BatchNorm1d"):
        chain.append(nn.BatchNorm1d(2))  # type: ignore[arg-type]
    assert len(chain) == 1


def test_distribute_with_the_wrong_number_of_inputs_raises_naming_both_counts() -> None:
    distribute = fl.Distribute(fl.Identity(), fl.Identity())
    with pytest.raises(ValueError, match="2 layers but received 3 inputs"):
        distribute(torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_chain_accepts_generators_and_lists_of_layers() -> None:
    def layers() -> Iterator[fl.Module]:
        yield fl.Linear(2, 2)
        yield fl.SiLU()

    chain = fl.Chain(layers(), [fl.ReLU()], fl.Sigmoid())
    assert [type(layer) for layer in chain] == [fl.Linear, fl.SiLU, fl.ReLU, fl.Sigmoid]
