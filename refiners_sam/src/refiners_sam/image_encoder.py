"""The image encoder of Segment Anything: a ViT with windowed and global attention, then a convolutional neck.

A 1024x1024 image becomes a 64x64 grid of 16x16 patches. Each transformer block attends either within 14x14
windows (the grid padded to a multiple of the window) or over the whole grid (the global blocks), always with
decomposed relative positions (MViTv2): the attention score of token (i1, j1) to token (i2, j2) gets
`q · R_h[i1 - i2] + q · R_w[j1 - j2]`. The neck maps the grid to the `(B, 256, 64, 64)` image embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device

# Largest attention bias materialised at once, in elements (64 MiB in float32): one head of a global block.
ATTENTION_BIAS_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The shape of a SAM image encoder: ViT width, depth, heads and which blocks attend globally."""

    embedding_dim: int
    num_layers: int
    num_heads: int
    global_attention_indices: tuple[int, ...]
    window_size: int = 14
    image_size: int = 1024
    patch_size: int = 16
    output_dim: int = 256


VIT_B = ImageEncoderConfig(embedding_dim=768, num_layers=12, num_heads=12, global_attention_indices=(2, 5, 8, 11))
VIT_L = ImageEncoderConfig(embedding_dim=1024, num_layers=24, num_heads=16, global_attention_indices=(5, 11, 17, 23))
VIT_H = ImageEncoderConfig(embedding_dim=1280, num_layers=32, num_heads=16, global_attention_indices=(7, 15, 23, 31))
PUBLISHED_SIZES = {"vit_b": VIT_B, "vit_l": VIT_L, "vit_h": VIT_H}


class PatchEncoder(fl.Chain):
    """Cut the image into patches and embed each one: `(B, 3, S, S)` to `(B, S / p, S / p, dim)`."""

    def __init__(self, embedding_dim: int, patch_size: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__(
            fl.Conv2d(3, embedding_dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


class PositionalEncoder(fl.Module):
    """Add a learned embedding per grid position to `(B, H, W, dim)` tokens."""

    def __init__(self, grid_size: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, grid_size, grid_size, embedding_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    def extra_repr(self) -> str:
        _, height, width, dim = self.weight.shape
        return f"grid_size={(height, width)}, embedding_dim={dim}"


class RelativePositionAttention(fl.Module):
    """Multi-head self-attention over a grid of tokens, with decomposed relative position biases.

    Takes the fused projections `(B, H, W, 3 * dim)` (queries, keys, values) and returns `(B, H, W, dim)`:
    `softmax(q kᵀ / √d + bias) v` per head, where `bias[(i1, j1), (i2, j2)] = q · rel_pos_h[i1 - i2 + H - 1] +
    q · rel_pos_w[j1 - j2 + W - 1]`. The bias goes to `scaled_dot_product_attention` as an additive mask, a few
    heads at a time, so no more than `ATTENTION_BIAS_ELEMENTS` of it exist at once.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(
                f"RelativePositionAttention: embedding_dim={embedding_dim} is not divisible by {num_heads}"
            )
        self.num_heads = num_heads
        self.grid_size = grid_size
        head_dim = embedding_dim // num_heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size[0] - 1, head_dim, device=device, dtype=dtype))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size[1] - 1, head_dim, device=device, dtype=dtype))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = qkv.shape
        if (height, width) != self.grid_size:
            raise ValueError(
                f"RelativePositionAttention at `{self.get_path()}` attends over a {self.grid_size} grid, "
                f"got {(height, width)}"
            )
        heads, dim = self.num_heads, channels // 3
        length = height * width
        q, k, v = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        grid_q = q.reshape(batch * heads, height, width, dim // heads)
        rel_h = torch.einsum("nhwc,hkc->nhwk", grid_q, _relative_table(self.rel_pos_h, height))
        rel_w = torch.einsum("nhwc,wkc->nhwk", grid_q, _relative_table(self.rel_pos_w, width))
        attended = _attend_with_bias(
            q.reshape(batch * heads, length, -1), k.reshape(batch * heads, length, -1), v, rel_h, rel_w
        )
        return attended.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, grid_size={self.grid_size}"


def _relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """`table[i - j + size - 1]` for every pair of positions `(i, j)`: `(size, size, head_dim)`."""
    positions = torch.arange(size, device=table.device)
    return table[positions[:, None] - positions[None, :] + size - 1]


def _attend_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """Attention of `(N, L, d)` queries with the bias `rel_h[..., :, None] + rel_w[..., None, :]`, in chunks of N."""
    count, length, _ = q.shape
    v = v.reshape(count, length, -1)
    per_chunk = max(1, ATTENTION_BIAS_ELEMENTS // (length * length))
    outputs: list[torch.Tensor] = []
    for start in range(0, count, per_chunk):
        chunk = slice(start, start + per_chunk)
        bias = (rel_h[chunk, :, :, :, None] + rel_w[chunk, :, :, None, :]).reshape(-1, length, length)
        outputs.append(
            F.scaled_dot_product_attention(q[None, chunk], k[None, chunk], v[None, chunk], attn_mask=bias[None])[0]
        )
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class WindowPartition(fl.Module):
    """`(B, H, W, C)` to `(B * windows, size, size, C)`, the grid first padded with zeros to a multiple of `size`."""

    def __init__(self, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        size = self.window_size
        x = F.pad(x, (0, 0, 0, -width % size, 0, -height % size))
        rows, cols = x.shape[1] // size, x.shape[2] // size
        windows = x.view(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
        return windows.reshape(batch * rows * cols, size, size, channels)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}"


class WindowMerge(fl.Module):
    """Undo `WindowPartition`: windows back to the `grid_size` grid, the padding dropped."""

    def __init__(self, window_size: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.window_size = window_size
        self.grid_size = grid_size

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        size = self.window_size
        height, width = self.grid_size
        rows, cols = -(-height // size), -(-width // size)
        batch = windows.shape[0] // (rows * cols)
        x = windows.view(batch, rows, cols, size, size, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(batch, rows * size, cols * size, -1)[:, :height, :width]

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, grid_size={self.grid_size}"


class AttentionBlock(fl.Residual):
    """`x + proj(attention(qkv(norm(x))))`, within windows of `window_size` or over the whole grid (None)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        grid_size: int,
        window_size: int | None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.window_size = window_size
        attention_grid = (grid_size, grid_size) if window_size is None else (window_size, window_size)
        qkv = fl.Linear(embedding_dim, 3 * embedding_dim, device=device, dtype=dtype)
        attention = RelativePositionAttention(embedding_dim, num_heads, attention_grid, device=device, dtype=dtype)
        proj = fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype)
        norm = fl.LayerNorm(embedding_dim, eps=1e-6, device=device, dtype=dtype)
        if window_size is None:
            super().__init__(norm, qkv, attention, proj)
        else:
            # The output projection acts on each token alone: applied after merging, it skips the padding.
            merge = WindowMerge(window_size, (grid_size, grid_size))
            super().__init__(norm, WindowPartition(window_size), qkv, attention, merge, proj)

    def extra_repr(self) -> str:
        return "global" if self.window_size is None else f"window_size={self.window_size}"


class FeedForward(fl.Residual):
    """`x + linear(gelu(linear(norm(x))))`."""

    def __init__(
        self, embedding_dim: int, feedforward_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.LayerNorm(embedding_dim, eps=1e-6, device=device, dtype=dtype),
            fl.Linear(embedding_dim, feedforward_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(feedforward_dim, embedding_dim, device=device, dtype=dtype),
        )


class TransformerBlock(fl.Chain):
    """Attention (windowed or global) then feed-forward, each pre-normalised and residual."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        grid_size: int,
        window_size: int | None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            AttentionBlock(embedding_dim, num_heads, grid_size, window_size, device=device, dtype=dtype),
            FeedForward(embedding_dim, 4 * embedding_dim, device=device, dtype=dtype),
        )


class Transformer(fl.Chain):
    """The stack of transformer blocks."""


class Neck(fl.Chain):
    """`(B, H, W, dim)` tokens to the `(B, out, H, W)` image embedding: 1x1 conv, norm, 3x3 conv, norm."""

    def __init__(
        self, embedding_dim: int, output_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.Permute(0, 3, 1, 2),
            fl.Conv2d(embedding_dim, output_dim, kernel_size=1, use_bias=False, device=device, dtype=dtype),
            fl.LayerNorm2d(output_dim, device=device, dtype=dtype),
            fl.Conv2d(output_dim, output_dim, kernel_size=3, padding=1, use_bias=False, device=device, dtype=dtype),
            fl.LayerNorm2d(output_dim, device=device, dtype=dtype),
        )


class ImageEncoder(fl.Chain):
    """SAM's ViT image encoder: a normalised, padded `(B, 3, S, S)` image to its `(B, 256, S/16, S/16)` embedding.

    The default arguments give ViT-B; `ImageEncoder.from_config(VIT_L)` (or `VIT_H`) the larger published sizes.
    Every parameter is created on `device` with `dtype`. Raises ValueError if `num_heads` does not divide
    `embedding_dim` or a global attention index is not a layer index.
    """

    def __init__(
        self,
        embedding_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        global_attention_indices: tuple[int, ...] = (2, 5, 8, 11),
        window_size: int = 14,
        image_size: int = 1024,
        patch_size: int = 16,
        output_dim: int = 256,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if any(not 0 <= index < num_layers for index in global_attention_indices):
            raise ValueError(
                f"ImageEncoder: global_attention_indices={global_attention_indices} must index its {num_layers} layers"
            )
        self.config = ImageEncoderConfig(
            embedding_dim=embedding_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            global_attention_indices=tuple(global_attention_indices),
            window_size=window_size,
            image_size=image_size,
            patch_size=patch_size,
            output_dim=output_dim,
        )
        grid_size = image_size // patch_size
        super().__init__(
            PatchEncoder(embedding_dim, patch_size, device=device, dtype=dtype),
            PositionalEncoder(grid_size, embedding_dim, device=device, dtype=dtype),
            Transformer(
                TransformerBlock(
                    embedding_dim,
                    num_heads,
                    grid_size,
                    None if index in global_attention_indices else window_size,
                    device=device,
                    dtype=dtype,
                )
                for index in range(num_layers)
            ),
            Neck(embedding_dim, output_dim, device=device, dtype=dtype),
        )

    @classmethod
    def from_config(
        cls, config: ImageEncoderConfig, device: Device = None, dtype: torch.dtype | None = None
    ) -> ImageEncoder:
        """Build the encoder that `config` describes (e.g. `VIT_B`, `VIT_L`, `VIT_H`)."""
        return cls(
            embedding_dim=config.embedding_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            global_attention_indices=config.global_attention_indices,
            window_size=config.window_size,
            image_size=config.image_size,
            patch_size=config.patch_size,
            output_dim=config.output_dim,
            device=device,
            dtype=dtype,
        )

    @property
    def grid_size(self) -> int:
        """Height and width of the image embedding, in patches."""
        return self.config.image_size // self.config.patch_size

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"embedding_dim={config.embedding_dim}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
            f"global_attention_indices={config.global_attention_indices}"
        )
