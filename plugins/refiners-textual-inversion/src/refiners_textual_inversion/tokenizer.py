"""Tokenize prompts with new tokens: the input side of textual inversion."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

import refiners_core.fluxion as fl
from refiners_sd15.clip import CLIPTokenizer, TokenIds


class TextualInversionTokenizer(fl.Module):
    """Prompts to token ids as `tokenizer` gives them, except that each new token becomes its own ids.

    New tokens are found in the prompt in any case and anywhere, even inside a word, the longest first where
    several match at the same place, as transformers' tokenizers find the tokens added by `add_tokens`. A token
    can stand for several ids (a multi-vector embedding), like the prompt expansion of diffusers'
    `load_textual_inversion`. Sequences are built as `tokenizer` builds them: start of text, at most
    `sequence_length - 2` ids, end of text, padding. Token ids (an integer tensor) go through unchanged.
    """

    def __init__(self, tokenizer: CLIPTokenizer, token_ids: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__()
        self._tokenizer = [tokenizer]  # not a child layer: it belongs to the encoder's TokenIds
        self._token_ids: dict[str, tuple[int, ...]] = {}
        self._pattern: re.Pattern[str] | None = None
        self.set_tokens(token_ids or {})

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The tokenizer of the text encoder, which encodes the text around the new tokens."""
        return self._tokenizer[0]

    @property
    def token_ids(self) -> dict[str, tuple[int, ...]]:
        """New token (lowercase) -> its ids."""
        return dict(self._token_ids)

    def set_tokens(self, token_ids: Mapping[str, Sequence[int]]) -> None:
        """Replace the new tokens: token -> the ids it becomes (matched in any case)."""
        self._token_ids = {token.lower(): tuple(ids) for token, ids in token_ids.items()}
        alternatives = sorted(self._token_ids, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(re.escape(token) for token in alternatives), flags=re.IGNORECASE)
            if alternatives
            else None
        )

    def encode(self, text: str) -> list[int]:
        """The content token ids of `text`, new tokens included: no start/end of text, no padding, no truncation."""
        if self._pattern is None:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            ids += self.tokenizer.encode(text[start : match.start()])
            ids += self._token_ids[match.group().lower()]
            start = match.end()
        return ids + self.tokenizer.encode(text[start:])

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            return text
        tokenizer = self.tokenizer
        length = tokenizer.sequence_length
        rows: list[list[int]] = []
        for prompt in [text] if isinstance(text, str) else list(text):
            ids = [tokenizer.start_of_text_token_id, *self.encode(prompt)[: length - 2], tokenizer.end_of_text_token_id]
            rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)

    def extra_repr(self) -> str:
        return f"new_tokens={len(self._token_ids)}"


class TokenIdsAdapter(fl.Chain, fl.Adapter[TokenIds]):
    """In place of a text encoder's `TokenIds`: prompts are tokenized by a `TextualInversionTokenizer` first."""

    def __init__(self, target: TokenIds, tokenizer: TextualInversionTokenizer) -> None:
        with self.setup_adapter(target):
            super().__init__(tokenizer, target)
