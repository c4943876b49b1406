"""Check that a model came back exactly as it was: after an adapter's ejection, a refused file, a removed LoRA."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A clone of every tensor of `model.state_dict()`, in its order, to check later with `assert_state_unchanged`."""
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    """Assert `model.state_dict()` has the keys of `before` in the same order, and every tensor the same dtype and
    values bit for bit; the message names the first key that differs."""
    after = model.state_dict()
    assert list(after) == list(before), "the state_dict keys changed"
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
