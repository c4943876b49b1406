"""The prompt encoder of Segment Anything: points and box corners to sparse tokens, a mask to a dense embedding.

Points and box corners share one encoding: random Fourier features of their position in the padded input image,
plus a learned embedding of their type (`PointType`). A box is its two corners. A low-resolution mask (for
instance the logits of a previous prediction) is downscaled by small convolutions to the size of the image
embedding; without one, a learned "no mask" vector is used at every position.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device


class PointType(IntEnum):
    """The label of a sparse prompt token. `PADDING` marks the filler point added when there is no box."""

    PADDING = -1
    BACKGROUND = 0
    FOREGROUND = 1
    BOX_TOP_LEFT = 2
    BOX_BOTTOM_RIGHT = 3


class PointPositionalEncoding(fl.Module):
    """Random Fourier features of `(x, y)` positions: `[sin(2π (2p - 1) G), cos(2π (2p - 1) G)]` for `p` in [0, 1].

    Called with point coordinates `(B, N, 2)` in pixels of the `image_size` input and their labels `(B, N)`, it
    encodes the centre of each pixel and gives zeros for padding points. `grid` encodes every cell of a grid,
    the positions the mask decoder gives to the image embedding.
    """

    def __init__(
        self, embedding_dim: int = 256, image_size: int = 1024, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.gaussian_matrix = nn.Parameter(torch.randn(2, embedding_dim // 2, device=device, dtype=dtype))

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        """Features `(..., embedding_dim)` of `(..., 2)` positions normalised to [0, 1]."""
        projected = (2 * math.pi) * ((2 * positions - 1) @ self.gaussian_matrix)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, coordinates: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.encode((coordinates.to(self.gaussian_matrix.dtype) + 0.5) / self.image_size)
        return features.masked_fill((labels == PointType.PADDING)[..., None], 0.0)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Features of the centres of a `height x width` grid's cells, as a `(1, embedding_dim, H, W)` map."""
        device, dtype = self.gaussian_matrix.device, self.gaussian_matrix.dtype
        rows = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        cols = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        positions = torch.stack([cols[None, :].expand(height, width), rows[:, None].expand(height, width)], dim=-1)
        return self.encode(positions).permute(2, 0, 1)[None]

    def extra_repr(self) -> str:
        return f"embedding_dim={2 * self.gaussian_matrix.shape[1]}, image_size={self.image_size}"


class PointTypeEmbedding(fl.Module):
    """One learned vector per `PointType`, looked up from the labels `(B, N)` (the coordinates are ignored)."""

    def __init__(self, embedding_dim: int = 256, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()

        def vector() -> nn.Parameter:
            return nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))

        self.padding = vector()
        self.background = vector()
        self.foreground = vector()
        self.box_top_left = vector()
        self.box_bottom_right = vector()

    def forward(self, coordinates: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        table = torch.cat(
            [self.padding, self.background, self.foreground, self.box_top_left, self.box_bottom_right], dim=0
        )
        return table[labels.long() - PointType.PADDING]


class PointEncoder(fl.Sum):
    """Sparse prompt tokens `(B, N, dim)` from point coordinates `(B, N, 2)` (input pixels) and labels `(B, N)`."""

    def __init__(
        self, embedding_dim: int = 256, image_size: int = 1024, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            PointPositionalEncoding(embedding_dim, image_size, device=device, dtype=dtype),
            PointTypeEmbedding(embedding_dim, device=device, dtype=dtype),
        )

    @property
    def positional_encoding(self) -> PointPositionalEncoding:
        """The Fourier features, which also give the image embedding its positions."""
        return self.ensure_find(PointPositionalEncoding)


class MaskEncoder(fl.Chain):
    """A low-resolution mask `(B, 1, 4h, 4w)` to a dense embedding `(B, dim, h, w)`.

    `no_mask(batch, height, width)` is the dense embedding used when no mask is given.
    """

    def __init__(
        self, embedding_dim: int = 256, hidden_dim: int = 16, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        quarter = hidden_dim // 4
        super().__init__(
            fl.Conv2d(1, quarter, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(quarter, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(quarter, hidden_dim, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.LayerNorm2d(hidden_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(hidden_dim, embedding_dim, kernel_size=1, device=device, dtype=dtype),
        )
        self.no_mask_embedding = nn.Parameter(torch.randn(1, embedding_dim, device=device, dtype=dtype))

    def no_mask(self, batch: int, height: int, width: int) -> torch.Tensor:
        """The learned "no mask" vector at every position: `(batch, dim, height, width)`."""
        return self.no_mask_embedding.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
