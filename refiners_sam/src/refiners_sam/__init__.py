"""Segment Anything for refiners: image encoder, prompt encoder, mask decoder and predictor."""

from importlib.metadata import version

from refiners_sam.image_encoder import PUBLISHED_SIZES, VIT_B, VIT_H, VIT_L, ImageEncoder, ImageEncoderConfig
from refiners_sam.inputs import MAX_IMAGE_PIXELS, MAX_PROMPT_POINTS
from refiners_sam.mask_decoder import MaskDecoder
from refiners_sam.model import ImageEmbedding, SegmentAnything
from refiners_sam.prompt_encoder import MaskEncoder, PointEncoder, PointType

__version__ = version("refiners-sam")

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
