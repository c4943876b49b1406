"""CLIP for Stable Diffusion 1.5: the BPE tokenizer and the ViT-L/14 text encoder."""

from refiners_sd15.clip.config import (
    CLIP_TEXT_L,
    CLIPTextEncoderConfig,
    clip_text_config_from_ldm,
    clip_text_config_from_transformers,
)
from refiners_sd15.clip.mapping import (
    CLIP_TEXT_IGNORED_KEYS,
    TEXT_ENCODER_FORMAT,
    ldm_clip_text_mapping,
    transformers_clip_text_mapping,
)
from refiners_sd15.clip.text_encoder import (
    CLIPTextEncoderL,
    FeedForwardBlock,
    PositionalEncoder,
    SelfAttentionBlock,
    TokenEncoder,
    TokenIds,
    TransformerLayer,
)
from refiners_sd15.clip.tokenizer import CLIPTokenizer

__all__ = [
    "CLIP_TEXT_IGNORED_KEYS",
    "CLIP_TEXT_L",
    "CLIPTextEncoderConfig",
    "CLIPTextEncoderL",
    "CLIPTokenizer",
    "FeedForwardBlock",
    "PositionalEncoder",
    "SelfAttentionBlock",
    "TEXT_ENCODER_FORMAT",
    "TokenEncoder",
    "TokenIds",
    "TransformerLayer",
    "clip_text_config_from_ldm",
    "clip_text_config_from_transformers",
    "ldm_clip_text_mapping",
    "transformers_clip_text_mapping",
]
