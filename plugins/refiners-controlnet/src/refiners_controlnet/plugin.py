"""refiners-controlnet's plugin module, registered under the `refiners` entry point group.

Heavy imports (torch, the model) happen in the hooks and in the option's `apply`, not when the module is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, Reference, hookimpl
from refiners_sd15.unet_targets import sd_unet_targets

OPTION_HELP = (
    "steer the generation with a ControlNet (a diffusers ControlNetModel folder or hub id) and its conditioning "
    "image (resized to the generated size), with an optional scale (default 1.0); repeat the option for several "
    "ControlNets, whose residuals add up"
)
OPTION_METAVAR = "FOLDER:IMAGE[:SCALE]"


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="controlnet",
            factory=Reference("refiners_controlnet.adapter:ControlNetAdapter"),
            summary=(
                "ControlNet for SD1.5 and SDXL, steered by a conditioning image: "
                "ControlNetAdapter(unet, controlnet, scale)"
            ),
            targets=sd_unet_targets(),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    register(
        GenerateOptionSpec(
            flag="--controlnet",
            apply=Reference("refiners_controlnet.cli:apply_controlnet_option"),
            help=OPTION_HELP,
            metavar=OPTION_METAVAR,
            models=("sd15", "sdxl"),
            validate=Reference("refiners_controlnet.cli:validate_controlnet_option"),
        )
    )
