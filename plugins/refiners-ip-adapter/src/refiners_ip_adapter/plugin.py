"""refiners-ip-adapter's plugin module (entry point `ip_adapter = refiners_ip_adapter.plugin`).

It registers the `ip-adapter` adapter and the `--ip-adapter-encoder` and `--ip-adapter` options of `refiners generate`
(in that order: see `refiners_ip_adapter.cli`). Nothing is imported here but refiners_core.plugins: the references
are imported on first use, so the plugin registers without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, Reference, hookimpl
from refiners_sd15.unet_targets import sd_unet_targets

OPTION_HELP = (
    "prompt the generation with a reference image through an IP-Adapter (its released .safetensors or .bin weights), "
    "with an optional scale (default 1.0); the image encoder is the image_encoder/ folder beside the weights (or "
    "beside their folder), or --ip-adapter-encoder; repeat the option for several"
)
OPTION_METAVAR = "WEIGHTS:IMAGE[:SCALE]"
ENCODER_HELP = (
    "the image encoder of every --ip-adapter: a transformers CLIPVisionModelWithProjection folder (config.json and "
    "model.safetensors), instead of the image_encoder/ folder beside the weights"
)


def _create(target: Any, **options: Any) -> Any:
    """`IPAdapter.from_pretrained(target, **options)`: the registry's factory takes the target as `target=`."""
    from refiners_ip_adapter.adapter import IPAdapter

    return IPAdapter.from_pretrained(target, **options)


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="ip-adapter",
            factory=_create,
            summary="IP-Adapter for SD1.5 and SDXL, prompted by reference images: "
            "IPAdapter.from_pretrained(unet, weights, image_encoder=..., scale=...)",
            targets=sd_unet_targets(),
        )
    )


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    options = "refiners_ip_adapter.cli"
    models = ("sd15", "sdxl")
    register(
        GenerateOptionSpec(
            flag="--ip-adapter-encoder",
            apply=Reference(f"{options}:apply_encoder_option"),
            help=ENCODER_HELP,
            metavar="FOLDER",
            models=models,
            validate=Reference(f"{options}:validate_encoder_option"),
        )
    )
    register(
        GenerateOptionSpec(
            flag="--ip-adapter",
            apply=Reference(f"{options}:apply_ip_adapter_option"),
            help=OPTION_HELP,
            metavar=OPTION_METAVAR,
            models=models,
            validate=Reference(f"{options}:validate_ip_adapter_option"),
        )
    )
