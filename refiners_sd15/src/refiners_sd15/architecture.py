"""What the `architecture` class methods of the Stable Diffusion models share: reading a single file's shapes."""

from __future__ import annotations

from pathlib import Path

import torch

from refiners_core.checks import sniff_weights_format
from refiners_core.weights import read_safetensors_shapes


def single_file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the single-file checkpoint `path` as meta tensors, their shapes read from its safetensors header
    alone. Raises ValueError naming the file if it is not safetensors (the shapes of a torch checkpoint cannot be read
    without loading it), and what `read_safetensors_shapes` raises."""
    if sniff_weights_format(path) != "safetensors":
        raise ValueError(f"{path}: the architecture of a single file is read from a safetensors header only")
    return read_safetensors_shapes(path)[0]
