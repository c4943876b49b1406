"""The `adapter` kind: an Adapter on `fl.Linear` layers, registered with `refiners_register_adapters`."""

IMPLEMENTATION = '''\
"""`$Class`: a refiners adapter.

The skeleton scales its target's output per channel by a trained gain; replace it with your method and keep
`tests/` passing.
"""

from __future__ import annotations

import refiners_core.fluxion as fl
import torch
from refiners_core.fluxion.adapters import Adapter


class ${Class}Gain(fl.Module):
    """`x * (1 + scale * weight)`, one weight per channel, starting at zero: a fresh adapter changes nothing."""

    _scale: torch.Tensor

    def __init__(
        self, channels: int, scale: float = 1.0, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))
        # A buffer, not a Python float: a compiled model reads a new scale without recompiling.
        self.register_buffer("_scale", torch.tensor(float(scale), device=device, dtype=dtype), persistent=False)

    @property
    def scale(self) -> float:
        return float(self._scale)

    @scale.setter
    def scale(self, value: float) -> None:
        with torch.no_grad():
            self._scale.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self._scale * self.weight)


class $Class(fl.Chain, Adapter[fl.Linear]):
    """In the place of an `fl.Linear` target: the target, then its gain. `inject()` puts it in the model,
    `eject()` gives the model back exactly."""

    def __init__(self, target: fl.Linear, scale: float = 1.0) -> None:
        if not isinstance(target, fl.Linear):  # pyright: ignore[reportUnnecessaryIsInstance]
            where = f" at `{target.get_path()}`" if isinstance(target, fl.Module) else ""
            raise TypeError(f"$Class adapts fl.Linear layers, not {type(target).__name__}{where}")
        gain = ${Class}Gain(target.out_features, scale, device=target.weight.device, dtype=target.weight.dtype)
        with self.setup_adapter(target):
            super().__init__(target, gain)

    @property
    def gain(self) -> ${Class}Gain:
        return next(layer for layer in self if isinstance(layer, ${Class}Gain))

    @property
    def scale(self) -> float:
        return self.gain.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.gain.scale = value
'''

PLUGIN = '''\
"""The hooks of $distribution (entry point `$entry_point` in the `refiners` group)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, Reference, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    # References ("module:attribute") are imported on first use: registering imports neither torch nor the adapter.
    spec = AdapterSpec(
        name="$name",
        factory=Reference("$package.adapter:$Class"),
        summary="$summary",
        targets=(Reference("refiners_core.fluxion:Linear"),),
    )
    register(spec)
'''

TESTS = '''\
"""$Class keeps every promise of a refiners adapter, and refiners finds it."""

from __future__ import annotations

import refiners_core.fluxion as fl
import torch
from refiners_core.plugins import registry, resolve
from refiners_core.testing import check_adapter

from $package import $Class

INPUTS = (torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),)


def model() -> fl.Chain:
    torch.manual_seed(0)  # pyright: ignore[reportUnknownMemberType]
    return fl.Chain(fl.Linear(4, 8), fl.ReLU(), fl.Linear(8, 3))


def trained_adapter(on: fl.Chain) -> $Class:
    adapter = $Class(on.ensure_find(fl.Linear), scale=0.7)
    with torch.no_grad():  # a trained gain, so that the adapter changes the output
        adapter.gain.weight.normal_(generator=torch.Generator().manual_seed(2))
    return adapter


def test_the_adapter_keeps_every_promise() -> None:
    report = check_adapter(
        trained_adapter,
        model(),
        INPUTS,
        wrong_target=lambda on: $Class(on.ensure_find(fl.ReLU)),  # type: ignore[arg-type]
        wrong_target_names="ReLU at `Chain.ReLU`",
    )

    assert "eject restores the model" in report.checked


def test_the_adapter_changes_the_output_and_its_scale_matters() -> None:
    base = model()
    expected = base(*INPUTS)
    adapter = trained_adapter(base).inject()
    adapted = base(*INPUTS)
    adapter.scale = 0.0

    assert not torch.allclose(adapted, expected)
    assert torch.equal(base(*INPUTS), expected)


def test_refiners_finds_the_adapter() -> None:
    spec = registry(reload=True).adapters["$name"]

    assert resolve(spec.factory) is $Class
'''

MODULE = "adapter"
EXPORTS = ("$Class",)
DEPENDENCIES: tuple[str, ...] = ()
