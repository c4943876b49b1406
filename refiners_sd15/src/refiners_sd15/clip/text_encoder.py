"""CLIP text encoders: prompts to the embeddings a UNet attends to, as Stable Diffusion 1.5 and SDXL use them.

Same computation as transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`: token and position embeddings,
pre-norm transformer layers with causal self-attention (no padding mask: every position attends to the ones before
it, whatever the padding), then a final layer norm. SD1.5 takes the last hidden state; SDXL the penultimate one and,
from OpenCLIP ViT-bigG, the projected embedding of the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_core.fluxion.context import ContextError, Contexts
from refiners_core.module_names import DIFFUSERS, KOHYA, kohya_names, module_names
from refiners_sd15.clip.config import CLIP_TEXT_G, CLIP_TEXT_L, CLIPTextEncoderConfig
from refiners_sd15.clip.mapping import (
    SDXL_TEXT_ENCODER_2_FORMAT,
    TEXT_ENCODER_FORMAT,
    transformers_clip_text_mapping,
)
from refiners_sd15.clip.tokenizer import CLIPTokenizer
from refiners_sd15.loading import PretrainedComponent


class TokenIds(fl.Module):
    """Prompts to token ids with `tokenizer`; token ids (an integer tensor `(B, L)`) go through unchanged."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            return text
        return self.tokenizer(text)

    def extra_repr(self) -> str:
        return self.tokenizer.short_repr()


class TokenEncoder(fl.Module):
    """One learned vector per token id: `(B, L, D)` for token ids `(B, L)`, moved first to the table's device."""

    def __init__(
        self, vocabulary_size: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.vocabulary_size = vocabulary_size
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(vocabulary_size, embedding_dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":  # on meta, normal_ would import torch._dynamo (seconds)
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids.to(self.weight.device), self.weight)

    def extra_repr(self) -> str:
        return f"vocabulary_size={self.vocabulary_size}, embedding_dim={self.embedding_dim}"


class PositionalEncoder(fl.Module):
    """One learned vector per position: `(L, D)` for token ids `(B, L)`, added to every sequence of the batch."""

    def __init__(
        self, max_sequence_length: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.max_sequence_length = max_sequence_length
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(max_sequence_length, embedding_dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":  # on meta, normal_ would import torch._dynamo (seconds)
            nn.init.normal_(self.weight, std=0.01)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        length = token_ids.shape[-1]
        if length > self.max_sequence_length:
            raise ValueError(
                f"PositionalEncoder: sequences of at most {self.max_sequence_length} tokens, got {length} "
                "(tokenize with truncation)"
            )
        return self.weight[:length]

    def extra_repr(self) -> str:
        return f"max_sequence_length={self.max_sequence_length}, embedding_dim={self.embedding_dim}"


class SelfAttentionBlock(fl.Residual):
    """`x + attention(norm(x))`: causal multi-head self-attention, each position seeing itself and those before."""

    def __init__(
        self,
        embedding_dim: int,
        num_attention_heads: int,
        layer_norm_eps: float,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
            fl.SelfAttention(embedding_dim, num_heads=num_attention_heads, is_causal=True, device=device, dtype=dtype),
        )


class FeedForwardBlock(fl.Residual):
    """`x + linear(activation(linear(norm(x))))`, with CLIP's QuickGeLU or the exact GeLU."""

    def __init__(
        self,
        embedding_dim: int,
        feedforward_dim: int,
        layer_norm_eps: float,
        use_quick_gelu: bool,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.LayerNorm(embedding_dim, eps=layer_norm_eps, device=device, dtype=dtype),
            fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            fl.QuickGeLU() if use_quick_gelu else fl.GeLU(),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class TransformerLayer(fl.Chain):
    """One layer of the text transformer: self-attention, then feed-forward, each pre-normalised and residual."""

    def __init__(
        self,
        embedding_dim: int,
        num_attention_heads: int,
        feedforward_dim: int,
        layer_norm_eps: float,
        use_quick_gelu: bool,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            SelfAttentionBlock(embedding_dim, num_attention_heads, layer_norm_eps, device=device, dtype=dtype),
            FeedForwardBlock(
                embedding_dim, feedforward_dim, layer_norm_eps, use_quick_gelu, device=device, dtype=dtype
            ),
        )


TOKEN_IDS_CONTEXT = "clip_text_encoder"
"""Context in which an encoder with a pooled output keeps the token ids (key `token_ids`) for `EndOfTextToken`."""


class EndOfTextToken(fl.Module):
    """The hidden state at each sequence's end-of-text token: `(B, D)` for hidden states `(B, L, D)`.

    The token ids `(B, L)` are read from the `TOKEN_IDS_CONTEXT` context, where the encoder puts them. The token is
    the first `end_of_text_token_id` of each sequence or, when None, its largest id (transformers' rule for the
    published CLIP configs, see `CLIPTextEncoderConfig`).
    """

    def __init__(self, end_of_text_token_id: int | None = None) -> None:
        super().__init__()
        self.end_of_text_token_id = end_of_text_token_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token_ids: torch.Tensor | None = self.use_context(TOKEN_IDS_CONTEXT, key="token_ids").get("token_ids")
        if token_ids is None:
            raise ContextError(
                f"EndOfTextToken at `{self.get_path()}` needs the token ids: its encoder puts them in the "
                f"'{TOKEN_IDS_CONTEXT}' context after tokenizing (or `set_context('{TOKEN_IDS_CONTEXT}', "
                "{'token_ids': ...})`)"
            )
        token_ids = token_ids.to(device=x.device)
        if self.end_of_text_token_id is None:
            positions = token_ids.argmax(dim=-1)
        else:
            positions = token_ids.eq(self.end_of_text_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), positions]

    def extra_repr(self) -> str:
        if self.end_of_text_token_id is None:
            return "largest id"
        return f"end_of_text_token_id={self.end_of_text_token_id}"


class PooledTextEmbedding(fl.Chain):
    """The pooled text embedding `(B, projection_dim)` from the penultimate hidden states `(B, L, D)`: the last
    layer, the final norm, the hidden state at the end-of-text token, then the text projection (a linear map without
    bias; none when `projection_dim` is None, which gives `(B, D)`)."""

    def __init__(self, config: CLIPTextEncoderConfig, device: Device = None, dtype: torch.dtype | None = None) -> None:
        dim = config.embedding_dim
        super().__init__(
            _transformer_layer(config, device=device, dtype=dtype),
            fl.LayerNorm(dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            EndOfTextToken(config.end_of_text_token_id),
            (
                []
                if config.projection_dim is None
                else [fl.Linear(dim, config.projection_dim, bias=False, device=device, dtype=dtype)]
            ),
        )

    def init_context(self) -> Contexts:
        return {TOKEN_IDS_CONTEXT: {}}


def _transformer_layer(
    config: CLIPTextEncoderConfig, device: Device = None, dtype: torch.dtype | None = None
) -> TransformerLayer:
    return TransformerLayer(
        config.embedding_dim,
        config.num_attention_heads,
        config.feedforward_dim,
        config.layer_norm_eps,
        config.use_quick_gelu,
        device=device,
        dtype=dtype,
    )


class CLIPTextEncoderL(PretrainedComponent, fl.Chain):
    """CLIP ViT-L/14's text encoder, as Stable Diffusion 1.5 uses it: its last hidden state, after the final norm.

    Called on a prompt (or a list of N prompts), it tokenizes them with `tokenizer` and returns the embeddings
    `(1, 77, 768)` (or `(N, 77, 768)`); called on token ids `(B, L)` with `L <= max_sequence_length`, it returns
    `(B, L, embedding_dim)`. The output matches transformers' `CLIPTextModel(input_ids).last_hidden_state`.

    `CLIPTextEncoderL()` has the published SD1.5 architecture (`CLIP_TEXT_L`); another `CLIPTextEncoderConfig`
    describes other CLIP text transformers or outputs: with `CLIP_TEXT_L_PENULTIMATE` (SDXL's first text encoder)
    it returns the tuple `(penultimate hidden states (B, L, D), pooled embedding (B, D))`, matching transformers'
    `hidden_states[-2]` and `pooler_output` (see `CLIPTextEncoderConfig.output`). The config is kept as
    `encoder.config`. Every parameter is created on `device` with `dtype`.

    Args:
        config: the architecture and output.
        device: device of the parameters.
        dtype: dtype of the parameters (and so of the output).
        tokenizer: turns prompts into token ids; defaults to SD1.5's `CLIPTokenizer` of `max_sequence_length` ids.

    Raises:
        ValueError: if the tokenizer produces longer sequences than the config's `max_sequence_length`.
    """

    component_format = TEXT_ENCODER_FORMAT

    def __init__(
        self,
        config: CLIPTextEncoderConfig = CLIP_TEXT_L,
        device: Device = None,
        dtype: torch.dtype | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        if tokenizer is None:
            tokenizer = CLIPTokenizer(sequence_length=config.max_sequence_length)
        _check_sequence_length(self, tokenizer, config)
        self.config = config
        dim = config.embedding_dim
        embeddings = fl.Sum(
            TokenEncoder(config.vocabulary_size, dim, device=device, dtype=dtype),
            PositionalEncoder(config.max_sequence_length, dim, device=device, dtype=dtype),
        )
        if config.output == "last_hidden_state":
            super().__init__(
                TokenIds(tokenizer),
                embeddings,
                (_transformer_layer(config, device=device, dtype=dtype) for _ in range(config.num_layers)),
                fl.LayerNorm(dim, eps=config.layer_norm_eps, device=device, dtype=dtype),
            )
            return
        super().__init__(
            TokenIds(tokenizer),
            fl.SetContext(TOKEN_IDS_CONTEXT, "token_ids"),
            embeddings,
            (_transformer_layer(config, device=device, dtype=dtype) for _ in range(config.num_layers - 1)),
            fl.Parallel(fl.Identity(), PooledTextEmbedding(config, device=device, dtype=dtype)),
        )

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The tokenizer applied to prompts (it holds no weights: it is not part of the state_dict)."""
        return self.ensure_find(TokenIds).tokenizer

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Apply `tokenizer` to prompts from now on (a folder's own settings, e.g. SDXL's `tokenizer_2/`). Raises
        ValueError for a tokenizer of longer sequences than the config's `max_sequence_length`."""
        _check_sequence_length(self, tokenizer, self.config)
        self.ensure_find(TokenIds).tokenizer = tokenizer

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        """transformers or kohya module name -> our layer path (the `ForeignModuleNames` protocol, for LoRA files).

        `DIFFUSERS` names are `CLIPTextModel` module paths, with (`text_model.encoder.layers.0.self_attn.q_proj`,
        as published) or without (transformers >= 5.6) `text_model.`; `KOHYA` names are `lora_te_` + the published
        path with `_` for `.` (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
        """
        published = module_names(transformers_clip_text_mapping(self.config, prefix="text_model."))
        if convention == DIFFUSERS:
            return published | module_names(transformers_clip_text_mapping(self.config, prefix=""))
        if convention == KOHYA:
            return kohya_names(published, "lora_te_")
        return {}

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"embedding_dim={config.embedding_dim}, num_layers={config.num_layers}, "
            f"num_attention_heads={config.num_attention_heads}"
            + ("" if config.output == "last_hidden_state" else f", output={config.output!r}")
        )


def _check_sequence_length(encoder: CLIPTextEncoderL, tokenizer: CLIPTokenizer, config: CLIPTextEncoderConfig) -> None:
    if tokenizer.sequence_length > config.max_sequence_length:
        raise ValueError(
            f"{type(encoder).__name__}: the tokenizer gives sequences of {tokenizer.sequence_length} ids but the "
            f"encoder has max_sequence_length={config.max_sequence_length} positions"
        )


class CLIPTextEncoderG(CLIPTextEncoderL):
    """OpenCLIP ViT-bigG/14's text encoder, as SDXL uses it (`text_encoder_2/`): penultimate hidden states and
    projected pooled embedding.

    Called on a prompt (or N prompts), it returns the tuple `(penultimate hidden states (N, 77, 1280), pooled
    embedding (N, 1280))`, matching transformers' `CLIPTextModelWithProjection(input_ids, output_hidden_states=True)`
    `hidden_states[-2]` and `text_embeds`. The same layers as `CLIPTextEncoderL`, with the exact GeLU and a text
    projection (`CLIP_TEXT_G`); its default tokenizer pads with `!` (id 0) as SDXL's `tokenizer_2` does.
    `CLIPTextEncoderG.from_pretrained` reads the `text_encoder_2/` folder of an SDXL diffusers repository.

    Args:
        config: the architecture; its `output` must be `"penultimate_and_pooled"`.
        device: device of the parameters.
        dtype: dtype of the parameters (and so of the outputs).
        tokenizer: defaults to `CLIPTokenizer(sequence_length=config.max_sequence_length, pad_token_id=0)`.

    Raises:
        ValueError: for a config with another output, or a tokenizer of longer sequences than the config allows.
    """

    component_format = SDXL_TEXT_ENCODER_2_FORMAT

    def __init__(
        self,
        config: CLIPTextEncoderConfig = CLIP_TEXT_G,
        device: Device = None,
        dtype: torch.dtype | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        if config.output != "penultimate_and_pooled":
            raise ValueError(
                f"CLIPTextEncoderG returns the penultimate hidden states and the pooled embedding: its config needs "
                f"output='penultimate_and_pooled', got {config.output!r}"
            )
        if tokenizer is None:
            tokenizer = CLIPTokenizer(sequence_length=config.max_sequence_length, pad_token_id=0)
        super().__init__(config, device=device, dtype=dtype, tokenizer=tokenizer)
