"""Random weights for test models whose fresh initialisation would hide what a test checks (zero residuals...)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_parameters(module: nn.Module, seed: int, std: float) -> None:
    """Seed torch's global generator with `seed`, then replace every parameter of `module`, in order, by
    `torch.randn_like(parameter) * std`."""
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * std)
