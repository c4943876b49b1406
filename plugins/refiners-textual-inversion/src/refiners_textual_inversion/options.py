"""The `--embedding FILE[:TOKEN]` option of `refiners generate`: textual inversion embeddings for the prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refiners_sd15.clip import DoubleTextEncoder
from refiners_textual_inversion.adapter import TextualInversionAdapter
from refiners_textual_inversion.files import SDXLEmbedding, read_any_embedding
from refiners_textual_inversion.sdxl import SDXLTextualInversion


def parse_embedding_value(value: str) -> tuple[str, str | None]:
    """`(file, token)` from `FILE` or `FILE:TOKEN`, split at the last `:`.

    A value naming an existing file, or whose last `:` is followed by a path (`C:\\x.pt`, `a:b/x.pt`), is a file
    without token.
    """
    path, separator, token = value.rpartition(":")
    if not separator or not path or not token or "/" in token or "\\" in token or Path(value).is_file():
        return value, None
    return path, token


def apply_embedding_option(model: Any, values: list[str]) -> None:
    """Load every `--embedding` value into one `TextualInversionAdapter` on `model.clip_text_encoder` (for SDXL's
    `DoubleTextEncoder`, one `SDXLTextualInversion`), and inject it.

    All files are read and checked before the model is touched. Raises FileNotFoundError or ValueError naming
    the file at fault (an SD1.5 embedding on SDXL, or the reverse, included).
    """
    encoder = model.clip_text_encoder
    adapter = (
        SDXLTextualInversion(encoder) if isinstance(encoder, DoubleTextEncoder) else TextualInversionAdapter(encoder)
    )
    for value in values:
        path, token = parse_embedding_value(value)
        adapter.load(path, token=token)
    adapter.inject()


def validate_embedding_option(values: list[str]) -> None:
    """Read every `--embedding` file before the model is loaded (they are small): raises FileNotFoundError or
    ValueError naming the file (missing, unreadable, not an embedding, NaN or infinite values), a token given
    twice, or SD1.5 and SDXL embeddings given together."""
    tokens: dict[str, str] = {}
    kinds: dict[bool, str] = {}
    for value in values:
        path, token = parse_embedding_value(value)
        embedding = read_any_embedding(path)
        kinds.setdefault(isinstance(embedding, SDXLEmbedding), value)
        if len(kinds) > 1:
            raise ValueError(
                f"--embedding {kinds[True]} is an SDXL embedding (clip_l and clip_g) but --embedding {kinds[False]} "
                "is for a single text encoder (SD1.5): they cannot go on one model"
            )
        token = token if token is not None else embedding.name
        if token in tokens:
            raise ValueError(
                f"--embedding {value}: the token {token!r} is already given by --embedding {tokens[token]}"
            )
        tokens[token] = value
