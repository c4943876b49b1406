"""Parameter-free tensor plumbing: identity, reshapes, slicing and friends."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refiners_core.fluxion.module import Device, Module


class Identity(Module):
    """Return the input unchanged."""

    def forward(self, x: Any) -> Any:
        return x


class GetArg(Module):
    """Return the input at `index` (for chains that carry several values)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: Any) -> Any:
        return args[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


class Reshape(Module):
    """Reshape each sample of the batch to `shape` (the batch dimension is kept)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Flatten(Module):
    """`torch.flatten(x, start_dim, end_dim)`."""

    def __init__(self, start_dim: int = 0, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Unflatten(Module):
    """`x.unflatten(dim, sizes)`."""

    def __init__(self, dim: int, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.dim = dim
        self.sizes = tuple(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(self.dim, self.sizes)  # pyright: ignore[reportUnknownVariableType]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, sizes={self.sizes}"


class Permute(Module):
    """`x.permute(*dims)`."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class Transpose(Module):
    """`x.transpose(dim0, dim1)`."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)

    def extra_repr(self) -> str:
        return f"dim0={self.dim0}, dim1={self.dim1}"


class Squeeze(Module):
    """`x.squeeze(dim)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Unsqueeze(Module):
    """`x.unsqueeze(dim)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Slicing(Module):
    """Keep `start:end:step` along `dim`."""

    def __init__(self, dim: int = 0, start: int = 0, end: int | None = None, step: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.start = start
        self.end = end
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index: list[slice] = [slice(None)] * (self.dim % x.dim())
        sliced: torch.Tensor = x[(*index, slice(self.start, self.end, self.step))]
        return sliced

    def extra_repr(self) -> str:
        return f"dim={self.dim}, start={self.start}, end={self.end}, step={self.step}"


class Chunk(Module):
    """Split the input in `chunks` along `dim` and return the pieces as a tuple."""

    def __init__(self, chunks: int, dim: int = 0) -> None:
        super().__init__()
        self.chunks = chunks
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.chunk(self.chunks, dim=self.dim)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, dim={self.dim}"


class Multiply(Module):
    """`x * scale + bias` with constant numbers."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias

    def extra_repr(self) -> str:
        return f"scale={self.scale}, bias={self.bias}"


class Dropout(Module, nn.Dropout):
    """`torch.nn.Dropout`."""


class Parameter(Module):
    """A learned tensor of shape `dims`, returned once per sample of the input's batch (the input is ignored)."""

    def __init__(
        self, *dims: int, requires_grad: bool = True, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(torch.randn(*dims, device=device, dtype=dtype), requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(x.shape[0], *self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"
