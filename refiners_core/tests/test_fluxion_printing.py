"""`print(model)`: the layer tree with names, key sizes, a parameter count line and folded repeated blocks."""

import copy
import enum
import gc
import pickle
import weakref

import pytest
import torch

import refiners_core.fluxion as fl


class Block(fl.Chain):
    def __init__(self, dim: int) -> None:
        super().__init__(
            fl.LayerNorm(dim),
            fl.Residual(fl.Linear(dim, 4 * dim), fl.GeLU(), fl.Linear(4 * dim, dim)),
        )


class Tower(fl.Chain):
    def __init__(self, dim: int = 8, depth: int = 6) -> None:
        super().__init__(fl.Conv2d(3, dim, kernel_size=4, stride=4), *(Block(dim) for _ in range(depth)), fl.SiLU())


def parameter_count(model: fl.Chain) -> int:
    return sum(p.numel() for p in model.parameters())


def test_repr_starts_with_the_model_class_and_a_parameter_count_line() -> None:
    model = fl.Chain(fl.Linear(10, 20), fl.SiLU(), fl.Linear(20, 5))
    first_line = repr(model).splitlines()[0]
    assert first_line.startswith("Chain(")
    assert f"{parameter_count(model)} parameters" in first_line  # 325: small counts are written out
    assert "cpu" in first_line and "float32" in first_line


def test_large_parameter_counts_use_units() -> None:
    model = fl.Chain(fl.Linear(1000, 1000), fl.Linear(1000, 1000))  # 2_002_000 parameters
    assert "2.0M parameters" in repr(model).splitlines()[0]


@pytest.mark.parametrize(("count", "shown"), [(999, "999"), (1_500, "1.5K"), (999_999, "1.0M"), (999_950_000, "1.0B")])
def test_parameter_counts_are_rounded_into_the_right_unit(count: int, shown: str) -> None:
    model = fl.Chain(fl.Parameter(count, requires_grad=False, device="meta"))
    assert f"[{shown} parameters," in repr(model).splitlines()[0]


def test_repr_names_layers_and_shows_their_sizes() -> None:
    model = fl.Chain(fl.Linear(10, 20), fl.SiLU(), fl.Linear(20, 5, bias=False))
    text = repr(model)
    assert "(Linear_1) Linear(in_features=10, out_features=20)" in text
    assert "(Linear_2) Linear(in_features=20, out_features=5, bias=False)" in text
    assert "SiLU()" in text
    assert len(text.splitlines()) == 4


def test_repr_shows_the_dtype_after_a_move() -> None:
    model = fl.Chain(fl.Linear(2, 2))
    model.to(dtype=torch.float64)
    assert "float64" in repr(model).splitlines()[0]


def test_repr_folds_consecutive_identical_blocks() -> None:
    model = Tower(depth=6)
    text = repr(model)
    assert "(Block_1 … Block_6) Block(dim=8) ×6" in text
    assert "Block_3" not in text
    assert text.count("LayerNorm(") == 1  # the block's content is shown once
    assert "(Linear_1) Linear(in_features=8, out_features=32)" in text
    assert "(Linear_2) Linear(in_features=32, out_features=8)" in text
    assert len(text.splitlines()) < 12


def test_repr_does_not_fold_blocks_of_different_shapes() -> None:
    model = fl.Chain(Block(8), Block(8), Block(16))
    text = repr(model)
    assert "(Block_1 … Block_2) Block(dim=8) ×2" in text
    assert "(Block_3) Block(dim=16)" in text
    assert "in_features=16, out_features=64" in text


def test_repr_draws_a_tree() -> None:
    model = fl.Chain(fl.Chain(fl.Linear(2, 2)), fl.SiLU())
    lines = repr(model).splitlines()
    assert lines[1:] == ["├── Chain()", "│   └── Linear(in_features=2, out_features=2)", "└── SiLU()"]


def test_print_writes_the_tree(capsys: pytest.CaptureFixture[str]) -> None:
    model = Tower(depth=2)
    print(model)
    assert capsys.readouterr().out.strip() == repr(model)


def test_repr_shows_an_injected_adapter_under_its_target_name() -> None:
    from refiners_core.fluxion.adapters import Adapter

    class Scale(fl.Chain, Adapter[fl.Linear]):
        def __init__(self, target: fl.Linear) -> None:
            with self.setup_adapter(target):
                super().__init__(target, fl.Multiply(2.0))

    model = fl.Chain(fl.Linear(2, 3), fl.Linear(3, 2))
    first = model["Linear_1"]
    assert isinstance(first, fl.Linear)
    Scale(first).inject()
    text = repr(model)
    assert "(Linear_1) Scale()" in text
    assert "Multiply(scale=2.0, bias=0.0)" in text
    assert "(Linear_2) Linear(in_features=3, out_features=2)" in text


def test_leaf_repr_is_one_line_with_key_sizes() -> None:
    assert repr(fl.Linear(3, 4)) == "Linear(in_features=3, out_features=4)"
    assert repr(fl.GroupNorm(channels=8, num_groups=2)) == "GroupNorm(channels=8, num_groups=2, eps=1e-05)"
    assert "embedding_dim=16, num_heads=4" in repr(fl.Attention(16, num_heads=4)).splitlines()[0]
    assert "(3, 8, kernel_size=(3, 3)" in repr(fl.Conv2d(3, 8, kernel_size=3))


class Options(enum.Enum):
    FAST = "fast"


class Gate(fl.Module):
    """A user-defined layer without `extra_repr`."""

    def __init__(
        self,
        scale: float,
        inner: fl.Module,
        *sizes: int,
        mode: Options = Options.FAST,
        label: str = "gate",
        device: fl.Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.inner_kind = type(inner).__name__


def test_a_user_defined_layer_shows_the_constructor_arguments_it_was_given_that_differ_from_defaults() -> None:
    assert Gate(2.0, fl.SiLU()).short_repr() == "Gate(scale=2.0)"
    gate = Gate(0.5, fl.SiLU(), 3, 4, label="g", mode=Options.FAST, device="cpu", dtype=torch.float32)
    assert repr(gate) == "Gate(scale=0.5, sizes=(3, 4), label='g')"  # no layer, default, device or dtype
    assert repr(Tower(depth=2)).splitlines()[0].startswith("Tower(depth=2)  [")
    assert repr(Tower()).splitlines()[0].startswith("Tower()  [")


def test_the_constructor_arguments_survive_copies_and_pickling() -> None:
    gate = Gate(0.5, fl.SiLU(), label="g")
    for clone in (copy.deepcopy(gate), pickle.loads(pickle.dumps(gate)), gate.structural_copy()):
        assert repr(clone) == "Gate(scale=0.5, label='g')"


def test_a_layer_keeps_no_reference_to_the_layers_it_was_built_from() -> None:
    inner = fl.Linear(4, 4)
    alive = weakref.ref(inner)
    gate = Gate(0.5, inner, label="g")
    del inner
    gc.collect()
    assert alive() is None
    assert repr(gate) == "Gate(scale=0.5, label='g')"


def test_extra_repr_wins_over_the_constructor_arguments() -> None:
    class Shifted(fl.Module):
        def __init__(self, shift: int) -> None:
            super().__init__()
            self.shift = shift

        def extra_repr(self) -> str:
            return f"by {self.shift}"

    assert repr(Shifted(3)) == "Shifted(by 3)"
