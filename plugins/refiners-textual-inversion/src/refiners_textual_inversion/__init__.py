"""Textual inversion for refiners' Stable Diffusion 1.5 and SDXL: new prompt tokens from A1111, kohya and diffusers
embedding files.

from refiners_textual_inversion import TextualInversionAdapter

adapter = TextualInversionAdapter(sd.clip_text_encoder)
adapter.load("cat-toy.safetensors", token="<cat-toy>")
adapter.inject()
"""

from refiners_textual_inversion.adapter import TextualInversionAdapter
from refiners_textual_inversion.files import (
    Embedding,
    SDXLEmbedding,
    read_any_embedding,
    read_embedding,
    read_sdxl_embedding,
)
from refiners_textual_inversion.sdxl import SDXLTextualInversion
from refiners_textual_inversion.tokenizer import TextualInversionTokenizer, TokenIdsAdapter

__all__ = [
    "Embedding",
    "SDXLEmbedding",
    "SDXLTextualInversion",
    "TextualInversionAdapter",
    "TextualInversionTokenizer",
    "TokenIdsAdapter",
    "read_any_embedding",
    "read_embedding",
    "read_sdxl_embedding",
]
