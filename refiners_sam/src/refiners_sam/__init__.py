"""Segment Anything for refiners: image encoder, prompt encoder, mask decoder and predictor."""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_sam.image_encoder import PUBLISHED_SIZES, VIT_B, VIT_H, VIT_L, ImageEncoder, ImageEncoderConfig
    from refiners_sam.inputs import MAX_IMAGE_PIXELS, MAX_PROMPT_POINTS
    from refiners_sam.mask_decoder import MaskDecoder
    from refiners_sam.model import ImageEmbedding, SegmentAnything
    from refiners_sam.prompt_encoder import MaskEncoder, PointEncoder, PointType


__version__ = version("refiners-sam")

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PUBLISHED_SIZES": "refiners_sam.image_encoder",
        "VIT_B": "refiners_sam.image_encoder",
        "VIT_H": "refiners_sam.image_encoder",
        "VIT_L": "refiners_sam.image_encoder",
        "ImageEncoder": "refiners_sam.image_encoder",
        "ImageEncoderConfig": "refiners_sam.image_encoder",
        "MAX_IMAGE_PIXELS": "refiners_sam.inputs",
        "MAX_PROMPT_POINTS": "refiners_sam.inputs",
        "MaskDecoder": "refiners_sam.mask_decoder",
        "ImageEmbedding": "refiners_sam.model",
        "SegmentAnything": "refiners_sam.model",
        "MaskEncoder": "refiners_sam.prompt_encoder",
        "PointEncoder": "refiners_sam.prompt_encoder",
        "PointType": "refiners_sam.prompt_encoder",
    },
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_PROMPT_POINTS",
    "PUBLISHED_SIZES",
    "VIT_B",
    "VIT_H",
    "VIT_L",
    "ImageEmbedding",
    "ImageEncoder",
    "ImageEncoderConfig",
    "MaskDecoder",
    "MaskEncoder",
    "PointEncoder",
    "PointType",
    "SegmentAnything",
]
