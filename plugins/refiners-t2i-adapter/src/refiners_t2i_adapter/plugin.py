"""refiners-t2i-adapter's plugin module, registered under the `refiners` entry point group.

Heavy imports (torch, the model) happen in the hooks and in the option's `apply`, not when the module is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import AdapterSpec, hookimpl


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    from refiners_sd15.unet import SD1UNet
    from refiners_t2i_adapter.adapter import T2IAdapter

    targets: tuple[type, ...] = (SD1UNet,)
    try:  # SDXL's UNet, when refiners-sdxl is installed (the `sdxl` extra)
        from refiners_sdxl import SDXLUNet
    except ImportError:
        pass
    else:
        targets += (SDXLUNet,)
    register(
        AdapterSpec(
            name="t2i_adapter",
            factory=T2IAdapter,
            summary="T2I-Adapter for SD1.5 and SDXL, steered by a condition image: T2IAdapter(unet, model, scale)",
            targets=targets,
        )
    )
