"""refiners-t2i-adapter's plugin module, registered under the `refiners` entry point group.

It registers the `t2i_adapter` adapter and the `--t2i-adapter` option of `refiners generate`. Nothing is imported
here but refiners_core.plugins: the references are imported on first use, so the plugin registers without torch.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, Reference, hookimpl
from refiners_sd15.unet_targets import sd_unet_targets

FLAG = "--t2i-adapter"
OPTION_HELP = (
    "steer the generation with a T2I-Adapter (a diffusers T2IAdapter folder or hub id) and its condition image "
    "(resized to the generated size), with an optional scale (default 1.0); repeat the option for several "
    "adapters, whose features add up"
)
OPTION_METAVAR = "FOLDER:IMAGE[:SCALE]"


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="t2i_adapter",
            factory=Reference("refiners_t2i_adapter.adapter:T2IAdapter"),
            summary="T2I-Adapter for SD1.5 and SDXL, steered by a condition image: T2IAdapter(unet, model, scale)",
            targets=sd_unet_targets(),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    register(
        GenerateOptionSpec(
            flag=FLAG,
            apply=Reference("refiners_t2i_adapter.cli:apply_t2i_adapter_option"),
            help=OPTION_HELP,
            metavar=OPTION_METAVAR,
            models=("sd15", "sdxl"),
            validate=Reference("refiners_t2i_adapter.cli:validate_t2i_adapter_option"),
        )
    )
