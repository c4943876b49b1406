"""CLIP for Stable Diffusion: the BPE tokenizer, the text encoders of SD1.5 (CLIP ViT-L/14) and SDXL (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14), and SDXL's `DoubleTextEncoder` made of them."""

from refiners_sd15.clip.config import (
    CLIP_TEXT_G,
    CLIP_TEXT_L,
    CLIP_TEXT_L_PENULTIMATE,
    CLIPTextEncoderConfig,
    CLIPTextOutput,
    clip_text_config_from_ldm,
    clip_text_config_from_open_clip,
    clip_text_config_from_transformers,
)
from refiners_sd15.clip.double_text_encoder import ConcatenateTextEmbeddings, DoubleTextEncoder
from refiners_sd15.clip.mapping import (
    CLIP_TEXT_IGNORED_KEYS,
    OPEN_CLIP_TEXT_IGNORED_KEYS,
    SDXL_TEXT_ENCODER_2_FORMAT,
    SDXL_TEXT_ENCODER_FORMAT,
    TEXT_ENCODER_FORMAT,
    ldm_clip_text_mapping,
    open_clip_text_mapping,
    open_clip_text_tensors,
    transformers_clip_text_mapping,
)
from refiners_sd15.clip.text_encoder import (
    TOKEN_IDS_CONTEXT,
    CLIPTextEncoderG,
    CLIPTextEncoderL,
    EndOfTextToken,
    FeedForwardBlock,
    PooledTextEmbedding,
    PositionalEncoder,
    SelfAttentionBlock,
    TokenEncoder,
    TokenIds,
    TransformerLayer,
)
from refiners_sd15.clip.tokenizer import CLIPTokenizer

__all__ = [
    "CLIP_TEXT_G",
    "CLIP_TEXT_IGNORED_KEYS",
    "CLIP_TEXT_L",
    "CLIP_TEXT_L_PENULTIMATE",
    "OPEN_CLIP_TEXT_IGNORED_KEYS",
    "SDXL_TEXT_ENCODER_2_FORMAT",
    "SDXL_TEXT_ENCODER_FORMAT",
    "TEXT_ENCODER_FORMAT",
    "TOKEN_IDS_CONTEXT",
    "CLIPTextEncoderConfig",
    "CLIPTextEncoderG",
    "CLIPTextEncoderL",
    "CLIPTextOutput",
    "CLIPTokenizer",
    "ConcatenateTextEmbeddings",
    "DoubleTextEncoder",
    "EndOfTextToken",
    "FeedForwardBlock",
    "PooledTextEmbedding",
    "PositionalEncoder",
    "SelfAttentionBlock",
    "TokenEncoder",
    "TokenIds",
    "TransformerLayer",
    "clip_text_config_from_ldm",
    "clip_text_config_from_open_clip",
    "clip_text_config_from_transformers",
    "ldm_clip_text_mapping",
    "open_clip_text_mapping",
    "open_clip_text_tensors",
    "transformers_clip_text_mapping",
]
