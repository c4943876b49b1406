"""refiners-freeu's plugin module (entry point `freeu = refiners_freeu.plugin`).

It registers the `freeu` adapter (FreeU on one decoder skip connection of an SD1.5 or SDXL UNet) and the `--freeu`
option of `refiners generate`; nothing is built here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, Reference, hookimpl
from refiners_freeu.scales import SD15_SCALES, SDXL_SCALES

FREEU_METAVAR = "S1,S2,B1,B2"
FREEU_HELP = (
    "apply FreeU to the UNet with these factors, or 'default' for the values advised for the model (SD1.5: "
    f"{','.join(str(value) for value in SD15_SCALES.values())}; SDXL: "
    f"{','.join(str(value) for value in SDXL_SCALES.values())})"
)


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="freeu",
            factory=Reference("refiners_freeu.freeu:FreeUAdapter"),
            summary=(
                "FreeU on a decoder skip connection of an SD1.5 or SDXL UNet: FreeUAdapter(target, backbone_scale, "
                "skip_scale); FreeU(unet, s1, s2, b1, b2) covers the whole UNet"
            ),
            targets=(Reference("refiners_sd15.unet:ConcatenateSkip"),),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    register(
        GenerateOptionSpec(
            flag="--freeu",
            apply=Reference("refiners_freeu.options:apply_freeu_option"),
            help=FREEU_HELP,
            metavar=FREEU_METAVAR,
            models=("sd15", "sdxl"),
            validate=Reference("refiners_freeu.options:validate_freeu_option"),
        )
    )
