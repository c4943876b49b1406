"""The mask decoder of Segment Anything: a two-way transformer between prompt tokens and the image embedding.

The decoder is called with the sparse prompt tokens `(B, N, 256)` and reads the rest from its `"mask_decoder"`
context (set by `MaskDecoder.set_inputs`): the image embedding `(1, 256, h, w)`, its positional encoding
`(1, 256, h, w)` and the dense prompt embedding `(B, 256, h, w)`. Learned output tokens (one for the IoU score,
four for the masks) are put before the prompt tokens; two two-way blocks then update the tokens (queries) and
the image tokens (keys), each attending to the other. Hypernetwork MLPs turn each mask token into the weights of
a dot product with the upscaled image tokens, and an MLP turns the IoU token into one score per mask. It returns
the mask logits `(B, 4, 4h, 4w)` and the scores `(B, 4)`; the first mask is the single-mask output, the other
three the multimask ones.
"""

from __future__ import annotations

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device

CONTEXT = "mask_decoder"


class OutputTokens(fl.Module):
    """Put the learned IoU token and mask tokens before the prompt tokens: `(B, N, dim)` to `(B, 1 + M + N, dim)`."""

    def __init__(
        self,
        embedding_dim: int = 256,
        num_mask_tokens: int = 4,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.iou_token = nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))
        self.mask_tokens = nn.Parameter(torch.randn(num_mask_tokens, embedding_dim, device=device, dtype=dtype))

    def forward(self, prompt_tokens: torch.Tensor) -> torch.Tensor:
        learned = torch.cat([self.iou_token, self.mask_tokens], dim=0)
        return torch.cat([learned.expand(prompt_tokens.shape[0], -1, -1), prompt_tokens], dim=1)


class ImageTokens(fl.Chain):
    """The image embedding plus the dense prompt embedding, as `(B, h * w, dim)` tokens (the input is ignored)."""

    def __init__(self) -> None:
        super().__init__(
            fl.Sum(fl.UseContext(CONTEXT, "image_embedding"), fl.UseContext(CONTEXT, "dense_embedding")),
            fl.Flatten(2),
            fl.Transpose(1, 2),
        )


class ImagePositions(fl.Passthrough):
    """Store the image's positional encoding as `(1, h * w, dim)` tokens under the context key `key_positions`."""

    def __init__(self) -> None:
        super().__init__(
            fl.UseContext(CONTEXT, "image_positions"),
            fl.Flatten(2),
            fl.Transpose(1, 2),
            fl.SetContext(CONTEXT, "key_positions"),
        )


class WithPositions(fl.Sum):
    """`x + positions`, the positions read from the context key `key`."""

    def __init__(self, key: str) -> None:
        super().__init__(fl.Identity(), fl.UseContext(CONTEXT, key))


def _pick(index: int, key: str | None = None) -> fl.Chain:
    """The `index`-th of `(queries, keys)`, plus its positions when `key` is given."""
    return fl.Chain(fl.GetArg(index), WithPositions(key)) if key else fl.Chain(fl.GetArg(index))


class TokenSelfAttention(fl.Chain):
    """`(queries, keys)` to `(norm(queries + attention(q, q, queries)), keys)` with `q = queries + positions`.

    The first block uses neither the positions nor the residual: `norm(attention(queries, queries, queries))`.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        first: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        attention = fl.Attention(embedding_dim, num_heads, device=device, dtype=dtype)
        if first:
            update: fl.Module = fl.Chain(
                fl.Parallel(_pick(0), _pick(0), _pick(0)),
                attention,
            )
        else:
            update = fl.Residual(
                fl.Parallel(_pick(0, "query_positions"), _pick(0, "query_positions"), _pick(0)),
                attention,
            )
        super().__init__(
            fl.Parallel(update, fl.GetArg(1)),
            fl.Distribute(fl.LayerNorm(embedding_dim, device=device, dtype=dtype), fl.Identity()),
        )


class TokenToImageAttention(fl.Chain):
    """`(queries, keys)` to `(norm(queries + attention(queries + pos, keys + pos, keys)), keys)`."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        inner_dim: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.Residual(
                    fl.Parallel(_pick(0, "query_positions"), _pick(1, "key_positions"), _pick(1)),
                    fl.Attention(embedding_dim, num_heads, inner_dim=inner_dim, device=device, dtype=dtype),
                ),
                fl.GetArg(1),
            ),
            fl.Distribute(fl.LayerNorm(embedding_dim, device=device, dtype=dtype), fl.Identity()),
        )


class TokenFeedForward(fl.Chain):
    """`(queries, keys)` to `(norm(queries + linear(relu(linear(queries)))), keys)`."""

    def __init__(
        self, embedding_dim: int, feedforward_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.Distribute(
                fl.Chain(
                    fl.Residual(
                        fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
                        fl.ReLU(),
                        fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                ),
                fl.Identity(),
            )
        )


class ImageToTokenAttention(fl.Chain):
    """`(queries, keys)` to `(queries, norm(keys + attention(keys + pos, queries + pos, queries)))`."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        inner_dim: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.GetArg(0),
                fl.Chain(
                    fl.Parallel(fl.GetArg(1), fl.GetArg(0)),  # (keys, queries): a Residual adds its first input
                    fl.Residual(
                        fl.Parallel(_pick(0, "key_positions"), _pick(1, "query_positions"), _pick(1)),
                        fl.Attention(embedding_dim, num_heads, inner_dim=inner_dim, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(embedding_dim, device=device, dtype=dtype),
                ),
            ),
        )


class TwoWayBlock(fl.Chain):
    """Token self-attention, token-to-image attention, token feed-forward, image-to-token attention."""

    def __init__(
        self,
        embedding_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        inner_dim: int = 128,
        first: bool = False,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            TokenSelfAttention(embedding_dim, num_heads, first=first, device=device, dtype=dtype),
            TokenToImageAttention(embedding_dim, num_heads, inner_dim, device=device, dtype=dtype),
            TokenFeedForward(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            ImageToTokenAttention(embedding_dim, num_heads, inner_dim, device=device, dtype=dtype),
        )


class TwoWayTransformer(fl.Chain):
    """Two-way blocks, then a last token-to-image attention: `(queries, keys)` to `(queries, keys)`."""

    def __init__(
        self,
        embedding_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        inner_dim: int = 128,
        num_layers: int = 2,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            (
                TwoWayBlock(
                    embedding_dim, num_heads, feedforward_dim, inner_dim, first=index == 0, device=device, dtype=dtype
                )
                for index in range(num_layers)
            ),
            TokenToImageAttention(embedding_dim, num_heads, inner_dim, device=device, dtype=dtype),
        )


class OutputUpscaling(fl.Chain):
    """`(queries, keys)` to a `(B, dim / 8, 4h, 4w)` feature map of the image tokens, by two transposed convolutions."""

    def __init__(
        self, embedding_dim: int, grid_size: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.GetArg(1),
            fl.Transpose(1, 2),
            fl.Unflatten(2, (grid_size, grid_size)),
            fl.ConvTranspose2d(embedding_dim, embedding_dim // 4, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(embedding_dim // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(
                embedding_dim // 4, embedding_dim // 8, kernel_size=2, stride=2, device=device, dtype=dtype
            ),
            fl.GeLU(),
        )


class HypernetworkMLPs(fl.Concatenate):
    """`(queries, keys)` to `(B, M, dim / 8)`: an MLP per mask token, giving the weights of that mask's features."""

    def __init__(
        self, embedding_dim: int, num_mask_tokens: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            (
                fl.Chain(
                    fl.GetArg(0),
                    fl.Slicing(dim=1, start=1 + index, end=2 + index),  # mask tokens follow the IoU token
                    fl.MultiLinear(embedding_dim, embedding_dim // 8, embedding_dim, 3, device=device, dtype=dtype),
                )
                for index in range(num_mask_tokens)
            ),
            dim=1,
        )


class MaskProduct(fl.Module):
    """Mask logits `(B, M, H, W)`: each mask's weights `(B, M, C)` dotted with the features `(B, C, H, W)`."""

    def forward(self, weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        return (weights @ features.view(batch, channels, height * width)).view(batch, -1, height, width)


class MaskPrediction(fl.Chain):
    """`(queries, keys)` to the mask logits `(B, M, 4h, 4w)`."""

    def __init__(
        self,
        embedding_dim: int,
        num_mask_tokens: int,
        grid_size: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                HypernetworkMLPs(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
                OutputUpscaling(embedding_dim, grid_size, device=device, dtype=dtype),
            ),
            MaskProduct(),
        )


class IoUPrediction(fl.Chain):
    """`(queries, keys)` to one predicted IoU score per mask, `(B, M)`, from the IoU token."""

    def __init__(
        self,
        embedding_dim: int,
        num_mask_tokens: int,
        hidden_dim: int = 256,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.GetArg(0),
            fl.Slicing(dim=1, start=0, end=1),
            fl.MultiLinear(embedding_dim, num_mask_tokens, hidden_dim, 3, device=device, dtype=dtype),
            fl.Flatten(1),
        )


class Predictions(fl.Parallel):
    """`(queries, keys)` to `(mask logits, IoU scores)`."""


class MaskDecoder(fl.Chain):
    """Sparse prompt tokens `(B, N, dim)` to mask logits `(B, 4, 4h, 4w)` and IoU scores `(B, 4)`.

    Call `set_inputs` first with the image embedding, its positions and the dense prompt embedding.
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        grid_size: int = 64,
        num_multimask_outputs: int = 3,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        num_layers: int = 2,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.grid_size = grid_size
        num_mask_tokens = num_multimask_outputs + 1
        super().__init__(
            OutputTokens(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
            fl.SetContext(CONTEXT, "query_positions"),
            ImagePositions(),
            fl.Parallel(fl.Identity(), ImageTokens()),
            TwoWayTransformer(
                embedding_dim,
                num_heads,
                feedforward_dim,
                embedding_dim // 2,
                num_layers,
                device=device,
                dtype=dtype,
            ),
            Predictions(
                MaskPrediction(embedding_dim, num_mask_tokens, grid_size, device=device, dtype=dtype),
                IoUPrediction(embedding_dim, num_mask_tokens, device=device, dtype=dtype),
            ),
        )

    def set_inputs(
        self, image_embedding: torch.Tensor, image_positions: torch.Tensor, dense_embedding: torch.Tensor
    ) -> None:
        """Set what the decoder attends to: `(1, dim, h, w)` embedding and positions, `(B, dim, h, w)` dense prompt."""
        self.set_context(
            CONTEXT,
            {
                "image_embedding": image_embedding,
                "image_positions": image_positions,
                "dense_embedding": dense_embedding,
            },
        )

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, grid_size={self.grid_size}"
