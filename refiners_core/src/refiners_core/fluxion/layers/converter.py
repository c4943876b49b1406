"""`Converter`: move a chain's inputs to the device and dtype of its weights."""

from __future__ import annotations

from typing import Any

import torch

from refiners_core.fluxion.module import Module


class Converter(Module):
    """Move each input tensor to the device (`set_device`) and dtype (`set_dtype`) of the chain holding this layer.

    Put it first in a chain so that callers may pass CPU or float32 tensors to a model that lives on a GPU in
    float16. The device and dtype are read at every call from the parent's weights, so they follow `.to(...)`.
    Only floating point tensors change dtype (token ids stay integers); other inputs pass unchanged. Raises
    LookupError naming the layer when it has no parent, or when that parent holds no weights to take them from.
    """

    def __init__(self, set_device: bool = True, set_dtype: bool = True) -> None:
        super().__init__()
        self.set_device = set_device
        self.set_dtype = set_dtype

    def forward(self, *inputs: Any) -> Any:
        device, dtype = self._target()
        converted = tuple(self._convert(x, device, dtype) for x in inputs)
        return converted[0] if len(converted) == 1 else converted

    def _target(self) -> tuple[torch.device | None, torch.dtype | None]:
        parent = self.parent
        if parent is None:
            raise LookupError("Converter has no parent: it converts inputs for the chain that holds it")
        if next(parent.parameters(), None) is None and next(parent.buffers(), None) is None:
            raise LookupError(
                f"Converter at `{self.get_path()}` takes the device and dtype of `{parent.get_path()}`, "
                "which holds no weights"
            )
        return (parent.device if self.set_device else None), (parent.dtype if self.set_dtype else None)

    @staticmethod
    def _convert(x: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

    def extra_repr(self) -> str:
        return f"set_device={self.set_device}, set_dtype={self.set_dtype}"
