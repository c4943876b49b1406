"""refiners-freeu's plugin module (entry point `freeu = refiners_freeu.plugin`).

It registers the `freeu` adapter (FreeU on one decoder skip connection of an SD1.5 or SDXL UNet) and the `--freeu`
option of `refiners generate`; nothing is built here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    from refiners_freeu.freeu import FreeUAdapter
    from refiners_sd15.unet import ConcatenateSkip

    register(
        AdapterSpec(
            name="freeu",
            factory=FreeUAdapter,
            summary=(
                "FreeU on a decoder skip connection of an SD1.5 or SDXL UNet: FreeUAdapter(target, backbone_scale, "
                "skip_scale); FreeU(unet, s1, s2, b1, b2) covers the whole UNet"
            ),
            targets=(ConcatenateSkip,),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    from refiners_freeu.options import FREEU_HELP, FREEU_METAVAR, apply_freeu_option, validate_freeu_option

    register(
        GenerateOptionSpec(
            flag="--freeu",
            apply=apply_freeu_option,
            help=FREEU_HELP,
            metavar=FREEU_METAVAR,
            models=("sd15", "sdxl"),
            validate=validate_freeu_option,
        )
    )
