"""Textual inversion for refiners' Stable Diffusion 1.5 and SDXL: new prompt tokens from A1111, kohya and diffusers
embedding files.

from refiners_textual_inversion import TextualInversionAdapter

adapter = TextualInversionAdapter(sd.clip_text_encoder)
adapter.load("cat-toy.safetensors", token="<cat-toy>")
adapter.inject()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
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


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TextualInversionAdapter": "refiners_textual_inversion.adapter",
        "Embedding": "refiners_textual_inversion.files",
        "SDXLEmbedding": "refiners_textual_inversion.files",
        "read_any_embedding": "refiners_textual_inversion.files",
        "read_embedding": "refiners_textual_inversion.files",
        "read_sdxl_embedding": "refiners_textual_inversion.files",
        "SDXLTextualInversion": "refiners_textual_inversion.sdxl",
        "TextualInversionTokenizer": "refiners_textual_inversion.tokenizer",
        "TokenIdsAdapter": "refiners_textual_inversion.tokenizer",
    },
)

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
