"""T2I-Adapter for Stable Diffusion 1.5 and SDXL in refiners: light structural control (edges, depth, sketch, pose...)
from a condition image, added to the UNet's down path.

from refiners_t2i_adapter import T2IAdapter

t2i = T2IAdapter.from_pretrained(sd.unet, "TencentARC/t2iadapter_canny_sd15v2", scale=0.8)
t2i.inject()
t2i.set_condition(Image.open("edges.png"))
"""

from importlib.metadata import PackageNotFoundError, version

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
