"""The parts of Refiners 0.4's `Chain` API that its users rely on: `layer`, `find_parent`, slicing, pruning a
`walk` from its predicate, and the refusal of layers set as attributes."""

import copy
import io
import pickle

import pytest
import torch

import refiners_core.fluxion as fl


def tree() -> fl.Chain:
    """Chain(Sum(Chain(Linear), Linear), Chain(), Linear), the tree of Refiners' own walk tests."""
    return fl.Chain(fl.Sum(fl.Chain(fl.Linear(1, 1)), fl.Linear(1, 1)), fl.Chain(), fl.Linear(1, 1))


# layer


def test_layer_reads_a_name_a_position_a_dotted_path_and_a_tuple() -> None:
    chain = fl.Chain(fl.Sum(fl.Chain(), fl.Chain(fl.Linear(2, 3))))
    sum_ = chain.layer(0, fl.Sum)
    assert chain.layer("Sum", fl.Sum) is sum_
    assert chain.layer("Sum", fl.Chain) is sum_  # a Sum is a Chain
    second = chain.layer((0, 1), fl.Chain)
    assert second is list(sum_)[1]
    assert chain.layer((0, "Chain_2"), fl.Chain) is second
    assert chain.layer(("Sum", -1)) is second
    linear = chain.layer("Sum.Chain_2.Linear", fl.Linear)
    assert linear.weight.shape == (3, 2)
    assert chain.layer(("Sum.Chain_2", "Linear"), fl.Linear) is linear
    assert chain.layer((), fl.Chain) is chain


def test_layer_of_the_wrong_type_names_the_path_and_the_class_found() -> None:
    chain = fl.Chain(fl.Sum(fl.Chain(), fl.Chain(fl.Linear(2, 3))))
    with pytest.raises(TypeError, match=r"layer `Chain\.Sum\.Chain_2\.Linear` is a Linear, not a Conv2d"):
        chain.layer("Sum.Chain_2.Linear", fl.Conv2d)
    with pytest.raises(TypeError, match=r"layer `Chain\.Sum\.Chain_2` is a Chain, not a Sum"):
        chain.layer((0, 1), fl.Sum)
    with pytest.raises(TypeError, match=r"layer `Chain` is a Chain, not a Sum"):
        chain.layer((), fl.Sum)


def test_layer_with_a_missing_step_names_the_chain_and_what_it_holds() -> None:
    chain = fl.Chain(fl.Sum(fl.Chain(), fl.Chain(fl.Linear(2, 3))))
    with pytest.raises(KeyError, match=r"`Chain\.Sum` has no layer named 'Chain_3' \(it has: Chain_1, Chain_2\)"):
        chain.layer("Sum.Chain_3")
    with pytest.raises(IndexError, match=r"`Chain\.Sum` has 2 layers, no index 2"):
        chain.layer(("Sum", 2))
    with pytest.raises(KeyError, match=r"`Chain\.Sum\.Chain_2\.Linear` is a Linear, not a Chain: it has no layer 0"):
        chain.layer(("Sum", "Chain_2", "Linear", 0))


# find_parent


def test_find_parent_returns_the_chain_that_holds_a_layer_deep_in_the_tree() -> None:
    chain = tree()
    inner = chain.layer(("Sum", "Chain"), fl.Chain)
    assert chain.find_parent(inner.layer("Linear", fl.Linear)) is inner
    assert chain.find_parent(chain.layer("Linear")) is chain
    assert chain.ensure_find_parent(inner) is chain.layer("Sum")


def test_find_parent_of_a_layer_outside_the_tree_is_none_and_ensure_raises_naming_both() -> None:
    chain = tree()
    stranger = fl.Linear(1, 1)
    assert chain.find_parent(stranger) is None
    with pytest.raises(LookupError, match=r"Linear is not a layer of `Chain`"):
        chain.ensure_find_parent(stranger)


def test_find_parent_looks_inside_this_tree_only_for_a_shared_layer() -> None:
    shared = fl.Linear(1, 1)
    first, second = fl.Chain(shared), fl.Chain(fl.Chain(shared))
    assert shared.parent is first
    assert second.find_parent(shared) is second.layer("Chain")


# slicing


def test_a_slice_is_a_chain_of_the_same_class_with_structural_copies_of_those_layers() -> None:
    torch.manual_seed(0)
    chain = fl.Chain(
        fl.Linear(2, 2), fl.Linear(2, 2), fl.Chain(fl.Linear(2, 2), fl.SiLU()), fl.Residual(fl.Linear(2, 2))
    )
    sliced = chain[1:3]
    assert type(sliced) is fl.Chain and len(sliced) == 2 and len(chain) == 4
    assert [name for name, _ in sliced.named_children()] == ["Linear", "Chain"]
    assert sliced.layer("Linear") is chain.layer("Linear_2")  # layers with weights are shared
    assert sliced.layer("Chain") is not chain.layer("Chain")  # chains are copied
    assert sliced.layer("Chain.Linear") is chain.layer("Chain.Linear")
    x = torch.randn(3, 2)
    expected = chain.layer("Chain")(chain.layer("Linear_2")(x))
    assert torch.equal(sliced(x), expected)
    sliced.layer("Chain", fl.Chain).pop()  # editing the slice leaves the chain as it was
    assert len(chain.layer("Chain", fl.Chain)) == 2
    assert chain.layer("Linear_2").parent is chain
    assert type(fl.Residual(fl.Linear(2, 2), fl.SiLU())[:1]) is fl.Residual


def test_a_slice_keeps_the_chain_attributes_and_accepts_steps() -> None:
    concatenate = fl.Concatenate(fl.Identity(), fl.Multiply(2.0), fl.Multiply(3.0), dim=1)
    sliced = concatenate[::2]
    assert isinstance(sliced, fl.Concatenate) and sliced.dim == 1
    assert [type(layer) for layer in sliced] == [fl.Identity, fl.Multiply]
    assert torch.equal(sliced(torch.ones(1, 1)), torch.tensor([[1.0, 3.0]]))
    assert len(concatenate[5:]) == 0


# walk, layers and find


def test_walk_and_layers_recurse_as_in_refiners() -> None:
    chain = tree()
    sum_ = chain.layer("Sum", fl.Sum)
    inner = sum_.layer("Chain", fl.Chain)
    assert list(chain.walk()) == [(sum_, chain), (chain.layer("Chain"), chain), (chain.layer("Linear"), chain)]
    assert [layer for layer, _ in chain.walk(recurse=True)] == [
        sum_,
        inner,
        inner.layer("Linear"),
        sum_.layer("Linear"),
        chain.layer("Chain"),
        chain.layer("Linear"),
    ]
    nested = fl.Chain(fl.Chain(fl.Chain(fl.Chain())), fl.Chain(), fl.Linear(1, 1))
    assert len(list(nested.layers(fl.Chain))) == 2
    assert len(list(nested.layers(fl.Chain, recurse=True))) == 4


def test_a_predicate_raising_stop_iteration_prunes_that_branch_and_the_walk_goes_on() -> None:
    chain = tree()
    visited: list[str] = []

    def linear_outside_sum(layer: fl.Module, parent: fl.Chain) -> bool:
        visited.append(type(layer).__name__)
        if isinstance(layer, fl.Sum):
            raise StopIteration
        return isinstance(layer, fl.Linear)

    assert len(list(chain.walk(fl.Linear))) == 3
    assert list(chain.walk(linear_outside_sum)) == [(chain.layer("Linear"), chain)]
    assert visited == ["Sum", "Chain", "Linear"]  # nothing inside the Sum was looked at
    assert list(chain.walk(linear_outside_sum, recurse=True)) == [(chain.layer("Linear"), chain)]


def test_walk_refuses_a_subscripted_generic_naming_it() -> None:
    with pytest.raises(TypeError, match=r"subscripted generic .*Adapter\[.*Linear\]"):
        list(tree().walk(fl.Adapter[fl.Linear]))  # type: ignore[arg-type]


# layers set as attributes


def test_setting_a_layer_as_an_attribute_raises_saying_how_to_add_one_and_changes_nothing() -> None:
    chain = fl.Chain(fl.Linear(1, 1), fl.Linear(1, 1))
    before = dict(chain.named_children())
    with pytest.raises(
        ValueError, match=r"'foo' of Chain `Chain`.*chain\.append\(layer\).*chain\.insert\(index, layer\)"
    ):
        chain.foo = fl.Linear(1, 5)
    with pytest.raises(ValueError, match="Conv2d as attribute 'Linear_1'"):
        chain.Linear_1 = fl.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="'norm'"):
        chain.norm = torch.nn.LayerNorm(2)  # a plain torch module is refused too
    assert dict(chain.named_children()) == before
    assert "foo" not in chain.__dict__
    assert torch.equal(chain(torch.ones(1, 1)), chain.layer("Linear_2")(chain.layer("Linear_1")(torch.ones(1, 1))))


def test_a_chain_subclass_keeping_a_layer_as_attribute_is_refused_in_its_constructor_naming_the_class() -> None:
    class Encoder(fl.Chain):
        def __init__(self) -> None:
            super().__init__(fl.Linear(2, 2))
            self.head = fl.Linear(2, 1)

    with pytest.raises(ValueError, match="attribute 'head' of Encoder `Encoder`"):
        Encoder()


def test_a_layer_wrapped_in_a_list_and_plain_attributes_are_still_allowed() -> None:
    chain = fl.Chain(fl.Linear(1, 1))
    helper = fl.Linear(1, 1)
    chain.helpers = [helper]
    chain.scale = 2.0
    chain.weight_copy = torch.nn.Parameter(torch.zeros(1))
    assert chain.helpers == [helper] and chain.scale == 2.0
    assert len(chain) == 1 and "weight_copy" in dict(chain.named_parameters())


def test_torch_module_machinery_does_not_trip_the_attribute_guard() -> None:
    torch.manual_seed(0)
    chain = fl.Chain(fl.Linear(2, 2), fl.Residual(fl.Linear(2, 2), fl.SiLU()), fl.Converter())
    x = torch.randn(1, 2)
    expected = chain(x)
    for clone in (
        copy.deepcopy(chain),
        pickle.loads(pickle.dumps(chain)),
        chain.structural_copy(),
        chain[:],
        torch.load(io.BytesIO(_saved(chain)), weights_only=False),
    ):
        assert torch.equal(clone(x), expected)
    chain.load_state_dict(chain.state_dict())
    chain.to(dtype=torch.float64).to(dtype=torch.float32).half().float()
    chain.requires_grad_(False).eval().train().zero_grad()
    assert not any(parameter.requires_grad for parameter in chain.parameters())
    assert torch.allclose(chain(x), expected, atol=1e-2)  # the weights went through float16


def _saved(chain: fl.Chain) -> bytes:
    buffer = io.BytesIO()
    torch.save(chain, buffer)
    return buffer.getvalue()
