"""refiners-controlnet's plugin module, registered under the `refiners` entry point group.

Heavy imports (torch, the model) happen in the hooks and in the option's `apply`, not when the module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    from refiners_controlnet.adapter import ControlNetAdapter
    from refiners_sd15.unet import SD1UNet

    targets: tuple[type, ...] = (SD1UNet,)
    try:  # SDXL's UNet, when refiners-sdxl is installed (the `sdxl` extra)
        from refiners_sdxl import SDXLUNet
    except ImportError:
        pass
    else:
        targets += (SDXLUNet,)
    register(
        AdapterSpec(
            name="controlnet",
            factory=ControlNetAdapter,
            summary=(
                "ControlNet for SD1.5 and SDXL, steered by a conditioning image: "
                "ControlNetAdapter(unet, controlnet, scale)"
            ),
            targets=targets,
        )
    )


def _apply(model: Any, values: list[str]) -> None:
    from refiners_controlnet.cli import apply_controlnet_option

    apply_controlnet_option(model, values)


def _validate(values: list[str]) -> None:
    from refiners_controlnet.cli import validate_controlnet_option

    validate_controlnet_option(values)


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    from refiners_controlnet.cli import OPTION_HELP, OPTION_METAVAR

    register(
        GenerateOptionSpec(
            flag="--controlnet",
            apply=_apply,
            help=OPTION_HELP,
            metavar=OPTION_METAVAR,
            models=("sd15", "sdxl"),
            validate=_validate,
        )
    )
