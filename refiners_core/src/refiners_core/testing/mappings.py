"""Which files this process maps into memory, and whether a tensor's data lies in such a mapping (Linux only: read
from `/proc/self/maps`). Tests of `load_tensors(..., mmap=...)` and of the loaders that thread it use these to tell
the two contracts apart: copied weights leave no mapping, mapped ones are views of the file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MAPS = Path("/proc/self/maps")
CAN_READ_MAPPINGS = MAPS.exists()
"""Whether this system tells a process's mappings (`/proc/self/maps`): skip the tests that need them otherwise."""


def file_mappings(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The address ranges `[start, end)` where this process maps the file at `path` (compared resolved), in the
    order `/proc/self/maps` lists them; empty when none. Raises FileNotFoundError where there is no
    `/proc/self/maps`."""
    target = Path(path).resolve()
    ranges: list[tuple[int, int]] = []
    for line in MAPS.read_text(encoding="utf-8").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == target:
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def is_mapped(path: str | os.PathLike[str]) -> bool:
    """Whether this process maps the file at `path` into memory."""
    return bool(file_mappings(path))


def is_view_of_file(tensor: torch.Tensor, path: str | os.PathLike[str]) -> bool:
    """Whether every byte of `tensor`'s storage lies in one mapping of the file at `path` (a tensor read from the
    mapped file without a copy; a copy of it, even one made from the mapping, lies elsewhere). False for a tensor
    without data (no element)."""
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    merged: list[tuple[int, int]] = []  # the kernel may list one mapping as several adjacent ranges
    for begin, end in file_mappings(path):
        if merged and merged[-1][1] == begin:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return size > 0 and any(begin <= start and start + size <= end for begin, end in merged)
