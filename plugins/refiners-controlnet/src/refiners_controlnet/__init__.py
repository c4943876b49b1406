"""ControlNet for Stable Diffusion 1.5 and SDXL in refiners: steer the UNet with a conditioning image (edges, depth,
pose...).

from refiners_controlnet import ControlNet, ControlNetAdapter, image_to_condition

controlnet = ControlNet.from_pretrained("lllyasviel/control_v11p_sd15_canny")
adapter = ControlNetAdapter(sd.unet, controlnet, scale=1.0).inject()
adapter.set_condition(image_to_condition(edges))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_controlnet.adapter import ControlNetAdapter, ControlNetResiduals
    from refiners_controlnet.condition import image_to_condition
    from refiners_controlnet.controlnet import (
        Condition,
        ConditionBlock,
        ConditionEncoder,
        ControlNet,
        MiddleZeroConvolution,
        SkipZeroConvolution,
        ZeroConvolutions,
    )
    from refiners_controlnet.mapping import (
        CONTROLNET_FORMAT,
        SD15_CONTROLNET,
        SDXL_CONTROLNET,
        ControlNetConfig,
        controlnet_config_from_diffusers,
        diffusers_controlnet_mapping,
    )


try:
    __version__ = version("refiners-controlnet")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ControlNetAdapter": "refiners_controlnet.adapter",
        "ControlNetResiduals": "refiners_controlnet.adapter",
        "image_to_condition": "refiners_controlnet.condition",
        "Condition": "refiners_controlnet.controlnet",
        "ConditionBlock": "refiners_controlnet.controlnet",
        "ConditionEncoder": "refiners_controlnet.controlnet",
        "ControlNet": "refiners_controlnet.controlnet",
        "MiddleZeroConvolution": "refiners_controlnet.controlnet",
        "SkipZeroConvolution": "refiners_controlnet.controlnet",
        "ZeroConvolutions": "refiners_controlnet.controlnet",
        "CONTROLNET_FORMAT": "refiners_controlnet.mapping",
        "SD15_CONTROLNET": "refiners_controlnet.mapping",
        "SDXL_CONTROLNET": "refiners_controlnet.mapping",
        "ControlNetConfig": "refiners_controlnet.mapping",
        "controlnet_config_from_diffusers": "refiners_controlnet.mapping",
        "diffusers_controlnet_mapping": "refiners_controlnet.mapping",
    },
)

__all__ = [
    "CONTROLNET_FORMAT",
    "SD15_CONTROLNET",
    "SDXL_CONTROLNET",
    "Condition",
    "ConditionBlock",
    "ConditionEncoder",
    "ControlNet",
    "ControlNetAdapter",
    "ControlNetConfig",
    "ControlNetResiduals",
    "MiddleZeroConvolution",
    "SkipZeroConvolution",
    "ZeroConvolutions",
    "__version__",
    "controlnet_config_from_diffusers",
    "diffusers_controlnet_mapping",
    "image_to_condition",
]
