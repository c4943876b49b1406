"""The `--embedding FILE[:TOKEN]` option of `refiners generate`: textual inversion embeddings for the prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refiners_textual_inversion.adapter import TextualInversionAdapter
from refiners_textual_inversion.files import read_embedding

EMBEDDING_METAVAR = "FILE[:TOKEN]"
EMBEDDING_HELP = (
    "add a textual inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds) to the text encoder; "
    "TOKEN, written in the prompt, defaults to the name the file gives; repeatable"
)


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
    """Load every `--embedding` value into one `TextualInversionAdapter` on `model.clip_text_encoder`, and inject it.

    All files are read and checked before the model is touched. Raises FileNotFoundError or ValueError naming
    the file at fault.
    """
    adapter = TextualInversionAdapter(model.clip_text_encoder)
    for value in values:
        path, token = parse_embedding_value(value)
        adapter.load(path, token=token)
    adapter.inject()


def validate_embedding_option(values: list[str]) -> None:
    """Read every `--embedding` file before the model is loaded (they are small): raises FileNotFoundError or
    ValueError naming the file (missing, unreadable, not an embedding, NaN or infinite values) or a token given
    twice."""
    tokens: dict[str, str] = {}
    for value in values:
        path, token = parse_embedding_value(value)
        embedding = read_embedding(path)
        token = token if token is not None else embedding.name
        if token in tokens:
            raise ValueError(
                f"--embedding {value}: the token {token!r} is already given by --embedding {tokens[token]}"
            )
        tokens[token] = value
