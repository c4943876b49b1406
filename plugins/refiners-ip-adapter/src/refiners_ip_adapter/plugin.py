"""refiners-ip-adapter's plugin module (entry point `ip_adapter = refiners_ip_adapter.plugin`).

It registers the `ip-adapter` adapter and the `--ip-adapter-encoder` and `--ip-adapter` options of `refiners generate`
(in that order: see `refiners_ip_adapter.cli`); nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refiners_core.plugins import AdapterSpec, GenerateOptionSpec, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    from refiners_ip_adapter.adapter import IPAdapter
    from refiners_sd15.unet import SD1UNet

    targets: tuple[type, ...] = (SD1UNet,)
    try:
        from refiners_sdxl import SDXLUNet

        targets = (SD1UNet, SDXLUNet)
    except ImportError:
        pass
    register(
        AdapterSpec(
            name="ip-adapter",
            factory=lambda target, **options: IPAdapter.from_pretrained(target, **options),
            summary="IP-Adapter for SD1.5 and SDXL, prompted by reference images: "
            "IPAdapter.from_pretrained(unet, weights, image_encoder=..., scale=...)",
            targets=targets,
        )
    )


def _apply(model: Any, values: list[str]) -> None:
    from refiners_ip_adapter.cli import apply_ip_adapter_option

    apply_ip_adapter_option(model, values)


def _validate(values: list[str]) -> None:
    from refiners_ip_adapter.cli import validate_ip_adapter_option

    validate_ip_adapter_option(values)


def _apply_encoder(model: Any, values: list[str]) -> None:
    from refiners_ip_adapter.cli import apply_encoder_option

    apply_encoder_option(model, values)


def _validate_encoder(values: list[str]) -> None:
    from refiners_ip_adapter.cli import validate_encoder_option

    validate_encoder_option(values)


@hookimpl
def refiners_register_generate_options(register: Callable[[GenerateOptionSpec], None]) -> None:
    from refiners_ip_adapter.cli import ENCODER_HELP, OPTION_HELP, OPTION_METAVAR

    models = ("sd15", "sdxl")
    register(
        GenerateOptionSpec(
            flag="--ip-adapter-encoder",
            apply=_apply_encoder,
            help=ENCODER_HELP,
            metavar="FOLDER",
            models=models,
            validate=_validate_encoder,
        )
    )
    register(
        GenerateOptionSpec(
            flag="--ip-adapter",
            apply=_apply,
            help=OPTION_HELP,
            metavar=OPTION_METAVAR,
            models=models,
            validate=_validate,
        )
    )
