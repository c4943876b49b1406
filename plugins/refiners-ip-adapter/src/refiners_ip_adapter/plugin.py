"""refiners-ip-adapter's plugin module (entry point `ip_adapter = refiners_ip_adapter.plugin`).

It registers the `ip-adapter` adapter; nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, hookimpl


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
