"""IP-Adapter for Stable Diffusion 1.5 and SDXL in refiners: prompt the UNet with reference images.

from refiners_ip_adapter import IPAdapter

ip = IPAdapter.from_pretrained(sd.unet, "ip-adapter-plus_sd15.safetensors", image_encoder="image_encoder", scale=0.6)
ip.inject()
ip.set_image_embedding(ip.compute_image_embedding([Image.open("ref.png")]))
"""

from importlib.metadata import PackageNotFoundError, version

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
from refiners_ip_adapter.weights import KINDS, IPAdapterKind, IPAdapterWeights, PerceiverShape, read_ip_adapter_weights

try:
    __version__ = version("refiners-ip-adapter")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

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
