"""Which files this process maps into memory, and whether a tensor's data lies in such a mapping (Linux only: read
from `/proc/self/maps`). Tests of `load_tensors(..., mmap=...)` and of the loaders that thread it use these to tell
the two contracts apart: copied weights leave no mapping, mapped ones are views of the file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

MAPS = Path("/proc/self/maps")
CAN_READ_MAPPINGS = MAPS.exists()
"""Whether this system tells a process's mappings (`/proc/self/maps`): skip the tests that need them otherwise."""


def file_mappings(*paths: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The address ranges `[start, end)` where this process maps the files at `paths` (compared resolved), adjacent
    ranges merged (the kernel may list one mapping as several), in address order; empty when none. Raises
    FileNotFoundError where there is no `/proc/self/maps`."""
    targets = {Path(path).resolve() for path in paths}
    ranges: list[tuple[int, int]] = []
    for line in MAPS.read_text(encoding="utf-8").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) in targets:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def is_mapped(path: str | os.PathLike[str]) -> bool:
    """Whether this process maps the file at `path` into memory."""
    return bool(file_mappings(path))


def is_view_of_file(tensor: torch.Tensor, path: str | os.PathLike[str]) -> bool:
    """Whether every byte of `tensor`'s storage lies in one mapping of the file at `path` (a tensor read from the
    mapped file without a copy; a copy of it, even one made from the mapping, lies elsewhere). False for a tensor
    without data (no element)."""
    return _inside(tensor, file_mappings(path))


def parameters_viewing(model: torch.nn.Module, files: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """The names of `model`'s parameters that are views of one of `files` (mapped), and of those that are not
    (copied): a model loaded with `mmap=True` in the files' dtype has only the former, a default load only the
    latter."""
    ranges = file_mappings(*files)
    mapped: list[str] = []
    copied: list[str] = []
    for name, parameter in model.named_parameters():
        (mapped if _inside(parameter, ranges) else copied).append(name)
    return mapped, copied


def _inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    return size > 0 and any(begin <= start and start + size <= end for begin, end in ranges)
