"""`refiners_core.testing.check_adapter` passes a well-behaved adapter and catches each broken promise."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter
from refiners_core.testing import check_adapter


class Branch(fl.Module):
    """A low-rank branch whose scale lives in a buffer, as a LoRA's does."""

    _scale: torch.Tensor

    def __init__(self, target: fl.Linear, scale: float) -> None:
        super().__init__()
        self.down = fl.Linear(target.in_features, 2, bias=False)
        self.up = fl.Linear(2, target.out_features, bias=False)
        self.register_buffer("_scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self._scale


class Good(fl.Sum, Adapter[fl.Linear]):
    def __init__(self, target: fl.Linear, scale: float = 1.0) -> None:
        if not isinstance(target, fl.Linear):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"Good adapts fl.Linear layers, not {type(target).__name__} at `{target.get_path()}`")
        with self.setup_adapter(target):
            super().__init__(target, Branch(target, scale))

    @property
    def branch(self) -> Branch:
        return next(layer for layer in self if isinstance(layer, Branch))

    @property
    def scale(self) -> float:
        return float(self.branch._scale)

    @scale.setter
    def scale(self, value: float) -> None:
        self.branch._scale.fill_(value)


class FloatScale(Good):
    """Keeps its scale in a Python float: torch.compile guards on it, so a new scale recompiles."""

    def __init__(self, target: fl.Linear) -> None:
        super().__init__(target)
        self.factor = 1.0

    @property
    def scale(self) -> float:
        return self.factor

    @scale.setter
    def scale(self, value: float) -> None:
        self.factor = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        target, branch = tuple(self)
        return target(x) + self.factor * branch(x)


class Unregistered(Good):
    """Holds a tensor that is neither a parameter nor a buffer: `.to()` leaves it behind."""

    def __init__(self, target: fl.Linear) -> None:
        super().__init__(target)
        self.offset = torch.ones(target.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        return super().forward(x) + self.offset


class HardcodedDtype(Good):
    """Builds a float32 tensor in its forward: it breaks once the model is moved to another dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        return super().forward(x) @ torch.eye(self.target.out_features)


class GraphBreak(Good):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        torch._dynamo.graph_break()  # pyright: ignore[reportPrivateImportUsage]
        return super().forward(x)


class DirtyBuild(Good):
    """Changes its target's weights while being built."""

    def __init__(self, target: fl.Linear) -> None:
        with torch.no_grad():
            target.weight.mul_(2)
        super().__init__(target)


class LeakyInject(Good):
    """Patches its target's weights on inject and forgets to restore them on eject."""

    def inject(self, parent: fl.Chain | None = None) -> LeakyInject:
        with torch.no_grad():
            self.target.weight.add_(1)
        return super().inject(parent)


class Fusable(Good):
    """Offers fuse/unfuse, but unfuse does not restore the target's weight exactly."""

    def fuse(self) -> None:
        with torch.no_grad():
            branch = self.branch
            self.target.weight.add_(branch.up.weight @ branch.down.weight * branch._scale)
            self.branch._scale.zero_()

    def unfuse(self) -> None:
        with torch.no_grad():
            self.branch._scale.fill_(1.0)
            branch = self.branch
            self.target.weight.sub_(branch.up.weight @ branch.down.weight)


def model() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(fl.Linear(4, 8), fl.ReLU(), fl.Linear(8, 3))


INPUTS = (torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),)


def on_first_linear(kind: type[Good]) -> object:
    return lambda m: kind(m.ensure_find(fl.Linear))  # pyright: ignore[reportUnknownLambdaType, reportUnknownMemberType]


def test_a_well_behaved_adapter_passes_every_check() -> None:
    report = check_adapter(
        lambda m: [Good(m.ensure_find(fl.Linear)), Good(m.layer(2) if hasattr(m, "layer") else list(m)[2])],  # type: ignore[arg-type]
        model(),
        INPUTS,
        wrong_target=lambda m: Good(list(m)[1]),  # type: ignore[arg-type]
        wrong_target_names="ReLU",
    )

    assert "eject restores the model" in report.checked
    assert "torch.compile without graph break, scale without recompile" in report.checked
    assert "a wrong target is refused" in report.checked
    assert "fuse: not offered" in report.skipped


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (DirtyBuild, "after the adapters were built"),
        (LeakyInject, "structural copy with its adapters ejected: output: not bit-identical"),
        (Unregistered, "Unregistered: `self.offset` is a tensor held as a plain attribute"),
        (HardcodedDtype, "after .to(torch.float64), the adapted model fails: RuntimeError"),
        (GraphBreak, "torch.compile(fullgraph=True) cannot capture the adapted model"),
        (FloatScale, "changing the scale recompiles the adapted model"),
        (Fusable, "after fuse() then unfuse(): state_dict"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_each_broken_promise_is_caught(kind: type[Good], message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_adapter(lambda m: kind(m.ensure_find(fl.Linear)), model(), INPUTS)


def test_an_adapter_that_accepts_a_wrong_target_is_caught() -> None:
    class Lax(Good):
        def __init__(self, target: nn.Module) -> None:
            with self.setup_adapter(target):  # type: ignore[arg-type]
                fl.Sum.__init__(self, target, fl.Identity())  # type: ignore[arg-type]

    with pytest.raises(AssertionError, match="accepted a wrong target"):
        check_adapter(lambda m: Good(m.ensure_find(fl.Linear)), model(), INPUTS, wrong_target=lambda m: Lax(list(m)[1]))


def test_a_wrong_target_error_must_name_the_layer() -> None:
    with pytest.raises(AssertionError, match="does not name 'Linear_9'"):
        check_adapter(
            lambda m: Good(m.ensure_find(fl.Linear)),
            model(),
            INPUTS,
            wrong_target=lambda m: Good(list(m)[1]),  # type: ignore[arg-type]
            wrong_target_names="Linear_9",
        )
