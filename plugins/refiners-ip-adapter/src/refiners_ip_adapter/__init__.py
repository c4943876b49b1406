"""IP-Adapter for Stable Diffusion 1.5 and SDXL in refiners: prompt the UNet with reference images.

from refiners_ip_adapter import IPAdapter

ip = IPAdapter.from_pretrained(sd.unet, "ip-adapter-plus_sd15.safetensors", image_encoder="image_encoder", scale=0.6)
ip.inject()
ip.set_image_embedding(ip.compute_image_embedding([Image.open("ref.png")]))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_ip_adapter.adapter import IPAdapter
    from refiners_ip_adapter.attention import ImageAttention, ImageCrossAttention, ImageKeys, ImageTokens, ImageValues
    from refiners_ip_adapter.image_proj import (
        ImageProjection,
        LatentsAndFeatures,
        PerceiverAttention,
        PerceiverBlock,
        PerceiverResampler,
    )
    from refiners_ip_adapter.unets import text_cross_attentions, unet_family
    from refiners_ip_adapter.weights import (
        KINDS,
        IPAdapterKind,
        IPAdapterWeights,
        PerceiverShape,
        read_ip_adapter_weights,
    )


try:
    __version__ = version("refiners-ip-adapter")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "IPAdapter": "refiners_ip_adapter.adapter",
        "ImageAttention": "refiners_ip_adapter.attention",
        "ImageCrossAttention": "refiners_ip_adapter.attention",
        "ImageKeys": "refiners_ip_adapter.attention",
        "ImageTokens": "refiners_ip_adapter.attention",
        "ImageValues": "refiners_ip_adapter.attention",
        "ImageProjection": "refiners_ip_adapter.image_proj",
        "LatentsAndFeatures": "refiners_ip_adapter.image_proj",
        "PerceiverAttention": "refiners_ip_adapter.image_proj",
        "PerceiverBlock": "refiners_ip_adapter.image_proj",
        "PerceiverResampler": "refiners_ip_adapter.image_proj",
        "text_cross_attentions": "refiners_ip_adapter.unets",
        "unet_family": "refiners_ip_adapter.unets",
        "KINDS": "refiners_ip_adapter.weights",
        "IPAdapterKind": "refiners_ip_adapter.weights",
        "IPAdapterWeights": "refiners_ip_adapter.weights",
        "PerceiverShape": "refiners_ip_adapter.weights",
        "read_ip_adapter_weights": "refiners_ip_adapter.weights",
    },
)

__all__ = [
    "KINDS",
    "IPAdapter",
    "IPAdapterKind",
    "IPAdapterWeights",
    "ImageAttention",
    "ImageCrossAttention",
    "ImageKeys",
    "ImageProjection",
    "ImageTokens",
    "ImageValues",
    "LatentsAndFeatures",
    "PerceiverAttention",
    "PerceiverBlock",
    "PerceiverResampler",
    "PerceiverShape",
    "__version__",
    "read_ip_adapter_weights",
    "text_cross_attentions",
    "unet_family",
]
