"""ControlNet for Stable Diffusion 1.5 and SDXL in refiners: steer the UNet with a conditioning image (edges, depth,
pose...).

from refiners_controlnet import ControlNet, ControlNetAdapter, image_to_condition

controlnet = ControlNet.from_pretrained("lllyasviel/control_v11p_sd15_canny")
adapter = ControlNetAdapter(sd.unet, controlnet, scale=1.0).inject()
adapter.set_condition(image_to_condition(edges))
"""

from importlib.metadata import PackageNotFoundError, version

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
