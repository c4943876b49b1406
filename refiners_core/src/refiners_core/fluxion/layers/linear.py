"""Fully connected layers."""

from __future__ import annotations

import torch
from torch import nn

from refiners_core.fluxion.chain import Chain
from refiners_core.fluxion.layers.activations import ReLU
from refiners_core.fluxion.module import Device, Module


class Linear(Module, nn.Linear):
    """`torch.nn.Linear`: `x @ weight.T + bias`."""

    pure = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}" + (
            "" if self.bias is not None else ", bias=False"  # pyright: ignore[reportUnnecessaryComparison]
        )


class MultiLinear(Chain):
    """A multi-layer perceptron: `num_layers` Linear layers with an activation between them."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        inner_dim: int,
        num_layers: int,
        activation: type[Module] = ReLU,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"MultiLinear needs at least one layer, got num_layers={num_layers}")
        dims = [input_dim, *([inner_dim] * (num_layers - 1)), output_dim]
        layers: list[Module] = []
        for index, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if index > 0:
                layers.append(activation())
            layers.append(Linear(in_dim, out_dim, device=device, dtype=dtype))
        super().__init__(layers)
