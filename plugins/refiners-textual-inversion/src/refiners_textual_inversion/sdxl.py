"""`SDXLTextualInversion`: textual inversion for SDXL's two text encoders, one token standing for vectors in each."""

from __future__ import annotations

import os

import torch

from refiners_core.checks import check_finite_tensor
from refiners_sd15.clip import DoubleTextEncoder
from refiners_textual_inversion.adapter import TextualInversionAdapter
from refiners_textual_inversion.files import read_sdxl_embedding


class SDXLTextualInversion:
    """Textual inversion for SDXL's `DoubleTextEncoder`: each token gets its `clip_l` vectors in CLIP-L and its
    `clip_g` vectors in CLIP-G, as diffusers loads an SDXL embedding (`load_textual_inversion` once per encoder).

        ti = SDXLTextualInversion(sdxl.clip_text_encoder)
        ti.load("unaestheticXL.safetensors", token="<bad>")  # a file with `clip_l` and `clip_g` tensors
        ti.inject()
        embedding, pooled = sdxl.compute_clip_text_embedding("a cat", negative_text="<bad>")
        ti.eject()  # both encoders are exactly what they were

    It holds one `TextualInversionAdapter` per encoder (`adapter_l`, `adapter_g`); additions, `inject` and `eject`
    act on both, all or nothing. Raises TypeError if `target` is not a `DoubleTextEncoder`.
    """

    def __init__(self, target: DoubleTextEncoder) -> None:
        if not isinstance(target, DoubleTextEncoder):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"SDXLTextualInversion adapts SDXL's DoubleTextEncoder, not a {type(target).__name__}")
        self.target = target
        self.adapter_l = TextualInversionAdapter(target.text_encoder_l)
        """The new tokens of CLIP-L (the `clip_l` vectors)."""
        self.adapter_g = TextualInversionAdapter(target.text_encoder_g)
        """The new tokens of CLIP-G (the `clip_g` vectors)."""

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens added, in order."""
        return self.adapter_l.tokens

    @property
    def is_injected(self) -> bool:
        """Whether the adapters are in the text encoders."""
        return self.adapter_l.is_injected and self.adapter_g.is_injected

    def add_embedding(self, token: str, clip_l: torch.Tensor, clip_g: torch.Tensor, *, source: str = "tensors") -> None:
        """Add `token` standing for `clip_l` in CLIP-L and `clip_g` in CLIP-G (each `(dim,)` or `(n, dim)`).

        Raises ValueError, naming `source` and `clip_l` or `clip_g`, if either cannot be added (width other than the
        encoder's `embedding_dim`, token taken, NaN or infinite values); nothing is changed then.
        """
        clip_l, clip_g = (vectors.unsqueeze(0) if vectors.dim() == 1 else vectors for vectors in (clip_l, clip_g))
        checks = ((self.adapter_l, clip_l, "clip_l"), (self.adapter_g, clip_g, "clip_g"))
        for adapter, vectors, key in checks:
            what = f"{source} '{key}'"
            adapter.check_embedding(token, vectors, what)
            check_finite_tensor(f"textual inversion {what} (token {token!r}): the vectors", vectors)
        for adapter, vectors, key in checks:
            adapter.add_embedding(token, vectors, source=f"{source} '{key}'")

    def load(self, path: str | os.PathLike[str], token: str | None = None) -> str:
        """Add the SDXL embedding of a file with `clip_l` and `clip_g` tensors; return its token (`token`, else the
        file's stem). Raises FileNotFoundError, or ValueError naming the file (an SD1.5 embedding, unreadable,
        token taken, widths that are not the encoders'); nothing is changed then."""
        embedding = read_sdxl_embedding(path)
        token = token if token is not None else embedding.name
        self.add_embedding(token, embedding.clip_l, embedding.clip_g, source=embedding.source)
        return token

    def inject(self) -> SDXLTextualInversion:
        """Put both adapters in their encoders; if the second cannot be, the first is taken out. Raises AdapterError."""
        self.adapter_l.inject()
        try:
            self.adapter_g.inject()
        except BaseException:
            self.adapter_l.eject()
            raise
        return self

    def eject(self) -> None:
        """Take both adapters out: the encoders, their vocabularies and tokenizers are exactly what they were."""
        self.adapter_g.eject()
        self.adapter_l.eject()
