"""The `generate-option` kind: an option of `refiners generate`, registered with
`refiners_register_generate_options`."""

IMPLEMENTATION = '''\
"""`refiners generate --$name FACTOR`: an option of refiners' generation command.

The skeleton multiplies the noise the UNet predicts by FACTOR (below 1 gives softer images), through an adapter on
the UNet's last layer; replace it with your option and keep `tests/` passing.

`validate` checks the values before any model is loaded and raises naming the value at fault; `apply` changes the
loaded model.
"""

from __future__ import annotations

import math

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import Adapter

from $package.plugin import FLAG


class ${Class}Adapter(fl.Chain, Adapter[fl.Conv2d]):
    """The UNet's last convolution, then a constant factor."""

    def __init__(self, target: fl.Conv2d, factor: float) -> None:
        if not isinstance(target, fl.Conv2d):  # pyright: ignore[reportUnnecessaryIsInstance]
            where = f" at `{target.get_path()}`" if isinstance(target, fl.Module) else ""
            raise TypeError(f"${Class}Adapter adapts fl.Conv2d layers, not {type(target).__name__}{where}")
        with self.setup_adapter(target):
            super().__init__(target, fl.Multiply(factor))


def parse_factor(value: str) -> float:
    """The factor `value` gives; ValueError naming the flag and the value if it is not in (0, 4]."""
    try:
        factor = float(value)
    except ValueError:
        raise ValueError(f"{FLAG} {value!r}: not a number") from None
    if not (math.isfinite(factor) and 0 < factor <= 4):
        raise ValueError(f"{FLAG} {value!r}: the factor must be in (0, 4]")
    return factor


def validate(values: list[str]) -> None:
    for value in values:
        parse_factor(value)


def apply(model: object, values: list[str]) -> None:
    factor = math.prod(parse_factor(value) for value in values)
    unet = getattr(model, "unet", None)
    if not isinstance(unet, fl.Chain):
        raise TypeError(f"{FLAG} needs a model with a UNet, got {type(model).__name__}")
    last = list(unet.layers(fl.Conv2d))[-1]
    ${Class}Adapter(last, factor).inject()
'''

PLUGIN = '''\
"""The hooks of $distribution (entry point `$entry_point` in the `refiners` group)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import GenerateOptionSpec, Reference, hookimpl

FLAG = "--$name"
HELP = "multiply the predicted noise by FACTOR (0 < FACTOR <= 4; repeated: the factors multiply)"
METAVAR = "FACTOR"


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    # References ("module:attribute") are imported on first use: registering imports neither torch nor the option.
    register(
        GenerateOptionSpec(
            flag=FLAG,
            apply=Reference("$package.option:apply"),
            help=HELP,
            metavar=METAVAR,
            validate=Reference("$package.option:validate"),
        )
    )
'''

TESTS = '''\
"""`--$name`: values checked before loading, the model changed as it says, a sound adapter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import refiners_core.fluxion as fl
import torch
from refiners_core.plugins import registry
from refiners_core.testing import check_adapter
from refiners_sd15.testing import small_unet_config
from refiners_sd15.unet import SD1UNet

from $package import ${Class}Adapter

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))


def predicted_noise(unet: fl.Chain) -> torch.Tensor:
    unet.set_context("diffusion", {"timestep": torch.tensor([500]), "clip_text_embedding": TEXT})
    return unet(LATENTS)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "5"])
def test_bad_values_are_refused_before_loading_naming_them(value: str) -> None:
    spec = registry(reload=True).generate_options["--$name"]
    assert spec.validate is not None

    with pytest.raises(ValueError, match=f"--$name '{value}'"):
        spec.validate(["1", value])


def test_the_option_scales_the_predicted_noise() -> None:
    model = SimpleNamespace(unet=SD1UNet(small_unet_config()))  # what the option needs of a model: its UNet
    expected = predicted_noise(model.unet) * 0.5

    registry(reload=True).generate_options["--$name"].apply(model, ["0.25", "2"])

    torch.testing.assert_close(predicted_noise(model.unet), expected)


def test_the_adapter_keeps_every_promise() -> None:
    unet = SD1UNet(small_unet_config())

    check_adapter(
        lambda model: ${Class}Adapter(list(model.layers(fl.Conv2d))[-1], 0.5),
        unet,
        predicted_noise,
        scale=None,  # a constant factor: no scale to change
        run_moved=False,  # the text embedding is given through the context, in float32
        wrong_target=lambda model: ${Class}Adapter(model.ensure_find(fl.GroupNorm), 0.5),  # type: ignore[arg-type]
        wrong_target_names="GroupNorm at",
    )
'''

MODULE = "option"
EXPORTS = ("${Class}Adapter", "apply", "validate")
DEPENDENCIES: tuple[str, ...] = ("refiners-sd15",)
