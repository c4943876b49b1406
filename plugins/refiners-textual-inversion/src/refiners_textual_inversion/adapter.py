"""`TextualInversionAdapter`: new tokens, and their learned embeddings, for a CLIP text encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite_tensor
from refiners_sd15.clip import CLIPTextEncoderL, DoubleTextEncoder, TokenEncoder, TokenIds
from refiners_textual_inversion.files import read_embedding
from refiners_textual_inversion.tokenizer import TextualInversionTokenizer, TokenIdsAdapter


class TextualInversionAdapter(fl.Chain, fl.Adapter[TokenEncoder]):
    """Textual inversion for a `CLIPTextEncoderL` (or `CLIPTextEncoderG`): the vocabulary grows by new tokens with
    their own embeddings. For SDXL's two text encoders, see `SDXLTextualInversion`.

        adapter = TextualInversionAdapter(sd.clip_text_encoder)
        adapter.load("cat-toy.safetensors", token="<cat-toy>")  # diffusers learned_embeds or A1111 files
        adapter.load("EasyNegative.pt")  # the token is the name the file gives
        adapter.inject()
        embedding = sd.compute_clip_text_embedding("a <cat-toy> on a beach", negative_text="EasyNegative")
        adapter.eject()  # the encoder's vocabulary and weights are exactly what they were

    The adapter takes the place of the encoder's `TokenEncoder` (its target): ids below the encoder's
    `vocabulary_size` still get the original table's vectors, the new ids (numbered on from `vocabulary_size`, in
    the order tokens are added, as diffusers numbers them) get rows of the adapter's own `fl.Embedding`. While
    injected, a `TokenIdsAdapter` makes the encoder tokenize prompts with `tokenizer`, which turns each new token
    into its ids. A token of an embedding with several vectors stands for all of them; as in diffusers, the names
    `<token>_1`, `<token>_2`... stand for the second, third... vector alone. Tokens can be added before or after
    `inject()`, with `add_embedding` or `load`; a failed addition changes nothing.
    """

    def __init__(self, target: CLIPTextEncoderL) -> None:
        if not isinstance(target, CLIPTextEncoderL):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"TextualInversionAdapter adapts a CLIPTextEncoderL or CLIPTextEncoderG, not a {type(target).__name__}"
                + (
                    ": use SDXLTextualInversion for SDXL's DoubleTextEncoder"
                    if isinstance(target, DoubleTextEncoder)
                    else ""
                )
            )
        token_encoder = target.ensure_find(TokenEncoder)
        token_ids = target.ensure_find(TokenIds)
        weight = token_encoder.weight
        with self.setup_adapter(token_encoder):
            super().__init__(
                token_encoder,
                fl.Embedding(0, token_encoder.embedding_dim, device=weight.device, dtype=weight.dtype),
            )
        tokenizer = TextualInversionTokenizer(token_ids.tokenizer)
        self._tokenizer = [tokenizer]  # layers of the adapter's chains, not children of it
        self._token_ids_adapter = [TokenIdsAdapter(token_ids, tokenizer)]
        self._vectors: dict[str, range] = {}  # token as added -> its rows in the new embeddings
        self._sources: dict[str, str] = {}  # name of a vector (lowercase) -> the file (or "tensor") it comes from

    @property
    def tokenizer(self) -> TextualInversionTokenizer:
        """Tokenizes prompts with the new tokens (the encoder's own `tokenizer` does not know them)."""
        return self._tokenizer[0]

    @property
    def vocabulary_size(self) -> int:
        """Size of the encoder's own vocabulary: the first id of the new tokens."""
        return self.target.vocabulary_size

    @property
    def new_embeddings(self) -> fl.Embedding:
        """The vectors of the new tokens, one row per id from `vocabulary_size` on."""
        return self.ensure_find(fl.Embedding)

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens added, in order."""
        return tuple(self._vectors)

    def token_ids(self, token: str) -> list[int]:
        """The ids a token added to this adapter stands for. Raises KeyError naming the known tokens."""
        if token not in self._vectors:
            raise KeyError(f"no token {token!r} in this TextualInversionAdapter (tokens: {', '.join(self.tokens)})")
        return [self.vocabulary_size + row for row in self._vectors[token]]

    def add_embedding(self, token: str, vectors: torch.Tensor, *, source: str = "tensor") -> None:
        """Add `token` standing for `vectors`, `(dim,)` or `(n, dim)`: `n` new ids, `token`, `token_1`...

        Raises ValueError, naming `source` (e.g. the file read), if the token is empty, already in the CLIP
        vocabulary or added already (any case: prompts are matched in any case), or if the vectors do not have
        the encoder's `embedding_dim` or have NaN or infinite values. Nothing is changed then.
        """
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
        names = self.check_embedding(token, vectors, source)
        check_finite_tensor(f"textual inversion {source} (token {token!r}): the vectors", vectors)
        table = self.new_embeddings
        start = table.num_embeddings
        with torch.no_grad():
            grown = torch.cat([table.weight, vectors.to(table.weight)])
        table.weight = nn.Parameter(grown, requires_grad=table.weight.requires_grad)
        table.num_embeddings = start + len(names)
        self._vectors[token] = range(start, start + len(names))
        self._sources |= {name.lower(): source for name in names}
        token_ids: dict[str, Sequence[int]] = dict(self.tokenizer.token_ids)
        token_ids[token] = [self.vocabulary_size + row for row in self._vectors[token]]
        for index, name in enumerate(names[1:], start=1):
            token_ids[name] = [self.vocabulary_size + start + index]
        self.tokenizer.set_tokens(token_ids)

    def load(self, path: str | os.PathLike[str], token: str | None = None) -> str:
        """Add the embedding of an A1111 `.pt`/`.safetensors` or diffusers `learned_embeds` file; return its token.

        `token` defaults to the name the file gives (A1111 `name`, the diffusers key, else the file's stem).
        Raises FileNotFoundError, or ValueError naming the file (unreadable, not an embedding, token taken,
        wrong dimension). Nothing is changed then.
        """
        embedding = read_embedding(path)
        token = token if token is not None else embedding.name
        self.add_embedding(token, embedding.vectors, source=embedding.source)
        return token

    def inject(self, parent: fl.Chain | None = None) -> TextualInversionAdapter:
        super().inject(parent)
        try:
            self._token_ids_adapter[0].inject()
        except BaseException:
            super().eject()
            raise
        return self

    def eject(self) -> None:
        super().eject()
        self._token_ids_adapter[0].eject()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        (token_ids,) = args
        token_encoder, new_embeddings = self.target, self.new_embeddings
        token_ids = token_ids.to(token_encoder.weight.device)
        is_new = token_ids >= self.vocabulary_size
        embeddings = token_encoder(token_ids.masked_fill(is_new, 0))
        if not bool(is_new.any()):
            return embeddings
        if int(token_ids.max()) >= self.vocabulary_size + new_embeddings.num_embeddings:
            raise IndexError(
                f"token id {int(token_ids.max())} is out of range: the vocabulary has {self.vocabulary_size} tokens "
                f"and this adapter {new_embeddings.num_embeddings} new ones"
            )
        new = new_embeddings((token_ids - self.vocabulary_size).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new, embeddings)

    def extra_repr(self) -> str:
        return f"tokens={list(self._vectors)}"

    def check_embedding(self, token: str, vectors: torch.Tensor, source: str) -> list[str]:
        """The names the token's vectors `(n, dim)` would get (`token`, `token_1`...), changing nothing. Raises
        ValueError, naming `source`, if they cannot be added (see `add_embedding`; finiteness is not checked here)."""
        if not isinstance(token, str) or not token.strip():  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"textual inversion {source}: the token must be a non-empty string, got {token!r}")
        expected = self.target.embedding_dim
        if vectors.dim() != 2 or vectors.shape[0] == 0 or vectors.shape[1] != expected:
            raise ValueError(
                f"textual inversion {source} (token {token!r}): vectors of dimension {expected} expected (the text "
                f"encoder's embedding_dim), found shape {tuple(vectors.shape)}"
            )
        names = [token] + [f"{token}_{index}" for index in range(1, vectors.shape[0])]
        tokenizer = self.tokenizer.tokenizer
        for name in names:
            for spelling in dict.fromkeys((name, name.lower())):
                if (token_id := tokenizer.token_to_id(spelling)) is not None:
                    raise ValueError(
                        f"textual inversion {source}: token {name!r} is already in the CLIP vocabulary "
                        f"(id {token_id}), choose another token"
                    )
            if name.lower() in self._sources:
                raise ValueError(
                    f"textual inversion {source}: token {name!r} is already added to this text encoder by "
                    f"{self._sources[name.lower()]} (tokens match in any case), choose another token"
                )
        return names
