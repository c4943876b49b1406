"""T2I-Adapter for Stable Diffusion 1.5 and SDXL in refiners: light structural control (edges, depth, sketch, pose...)
from a condition image, added to the UNet's down path.

from refiners_t2i_adapter import T2IAdapter

t2i = T2IAdapter.from_pretrained(sd.unet, "TencentARC/t2iadapter_canny_sd15v2", scale=0.8)
t2i.inject()
t2i.set_condition(Image.open("edges.png"))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_core.fluxion.utils import image_to_tensor
    from refiners_t2i_adapter.adapter import T2IAdapter, T2IFeatures, T2IResidual
    from refiners_t2i_adapter.condition import condition_image
    from refiners_t2i_adapter.config import (
        ADAPTER_TYPES,
        SD15_FULL_ADAPTER,
        SDXL_FULL_ADAPTER,
        T2IAdapterConfig,
        t2i_adapter_config_from_diffusers,
    )
    from refiners_t2i_adapter.mapping import T2I_ADAPTER_FORMAT, diffusers_t2i_adapter_mapping
    from refiners_t2i_adapter.model import (
        AdapterBlock,
        AdapterResnetBlock,
        AvgPool2x2,
        FeatureStages,
        LightAdapterBlock,
        LightResnetBlock,
        PixelUnshuffle,
        T2IAdapterModel,
    )
    from refiners_t2i_adapter.placement import FeaturePlace, check_fits, feature_places


try:
    __version__ = version("refiners-t2i-adapter")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "image_to_tensor": "refiners_core.fluxion.utils",
        "T2IAdapter": "refiners_t2i_adapter.adapter",
        "T2IFeatures": "refiners_t2i_adapter.adapter",
        "T2IResidual": "refiners_t2i_adapter.adapter",
        "condition_image": "refiners_t2i_adapter.condition",
        "ADAPTER_TYPES": "refiners_t2i_adapter.config",
        "SD15_FULL_ADAPTER": "refiners_t2i_adapter.config",
        "SDXL_FULL_ADAPTER": "refiners_t2i_adapter.config",
        "T2IAdapterConfig": "refiners_t2i_adapter.config",
        "t2i_adapter_config_from_diffusers": "refiners_t2i_adapter.config",
        "T2I_ADAPTER_FORMAT": "refiners_t2i_adapter.mapping",
        "diffusers_t2i_adapter_mapping": "refiners_t2i_adapter.mapping",
        "AdapterBlock": "refiners_t2i_adapter.model",
        "AdapterResnetBlock": "refiners_t2i_adapter.model",
        "AvgPool2x2": "refiners_t2i_adapter.model",
        "FeatureStages": "refiners_t2i_adapter.model",
        "LightAdapterBlock": "refiners_t2i_adapter.model",
        "LightResnetBlock": "refiners_t2i_adapter.model",
        "PixelUnshuffle": "refiners_t2i_adapter.model",
        "T2IAdapterModel": "refiners_t2i_adapter.model",
        "FeaturePlace": "refiners_t2i_adapter.placement",
        "check_fits": "refiners_t2i_adapter.placement",
        "feature_places": "refiners_t2i_adapter.placement",
    },
)

__all__ = [
    "ADAPTER_TYPES",
    "SD15_FULL_ADAPTER",
    "SDXL_FULL_ADAPTER",
    "T2I_ADAPTER_FORMAT",
    "AdapterBlock",
    "AdapterResnetBlock",
    "AvgPool2x2",
    "FeaturePlace",
    "FeatureStages",
    "LightAdapterBlock",
    "LightResnetBlock",
    "PixelUnshuffle",
    "T2IAdapter",
    "T2IAdapterConfig",
    "T2IAdapterModel",
    "T2IFeatures",
    "T2IResidual",
    "__version__",
    "check_fits",
    "condition_image",
    "diffusers_t2i_adapter_mapping",
    "feature_places",
    "image_to_tensor",
    "t2i_adapter_config_from_diffusers",
]
