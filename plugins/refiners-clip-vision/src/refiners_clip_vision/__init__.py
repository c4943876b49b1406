"""CLIP image encoders in refiners: images to CLIP image embeddings (ViT-H/14, ViT-bigG/14).

from refiners_clip_vision import CLIPImageEncoder, preprocess_images

encoder = CLIPImageEncoder.from_pretrained("h94/IP-Adapter", subfolder="models/image_encoder")
image_embeds, penultimate = encoder(preprocess_images([image]))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_clip_vision.config import (
        CLIP_VIT_BIGG_14,
        CLIP_VIT_H_14,
        CLIPImageEncoderConfig,
        clip_image_config_from_transformers,
    )
    from refiners_clip_vision.encoder import (
        ClassToken,
        CLIPImageEncoder,
        FeedForwardBlock,
        ImageEmbedding,
        PatchEncoder,
        PositionalEncoder,
        SelfAttentionBlock,
        TransformerLayer,
        ViTEmbeddings,
    )
    from refiners_clip_vision.loading import transformers_clip_image_mapping
    from refiners_clip_vision.preprocessing import CLIP_MEAN, CLIP_STD, preprocess_image, preprocess_images


try:
    __version__ = version("refiners-clip-vision")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0"

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CLIP_VIT_BIGG_14": "refiners_clip_vision.config",
        "CLIP_VIT_H_14": "refiners_clip_vision.config",
        "CLIPImageEncoderConfig": "refiners_clip_vision.config",
        "clip_image_config_from_transformers": "refiners_clip_vision.config",
        "ClassToken": "refiners_clip_vision.encoder",
        "CLIPImageEncoder": "refiners_clip_vision.encoder",
        "FeedForwardBlock": "refiners_clip_vision.encoder",
        "ImageEmbedding": "refiners_clip_vision.encoder",
        "PatchEncoder": "refiners_clip_vision.encoder",
        "PositionalEncoder": "refiners_clip_vision.encoder",
        "SelfAttentionBlock": "refiners_clip_vision.encoder",
        "TransformerLayer": "refiners_clip_vision.encoder",
        "ViTEmbeddings": "refiners_clip_vision.encoder",
        "transformers_clip_image_mapping": "refiners_clip_vision.loading",
        "CLIP_MEAN": "refiners_clip_vision.preprocessing",
        "CLIP_STD": "refiners_clip_vision.preprocessing",
        "preprocess_image": "refiners_clip_vision.preprocessing",
        "preprocess_images": "refiners_clip_vision.preprocessing",
    },
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_VIT_BIGG_14",
    "CLIP_VIT_H_14",
    "CLIPImageEncoder",
    "CLIPImageEncoderConfig",
    "ClassToken",
    "FeedForwardBlock",
    "ImageEmbedding",
    "PatchEncoder",
    "PositionalEncoder",
    "SelfAttentionBlock",
    "TransformerLayer",
    "ViTEmbeddings",
    "__version__",
    "clip_image_config_from_transformers",
    "preprocess_image",
    "preprocess_images",
    "transformers_clip_image_mapping",
]
