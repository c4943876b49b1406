"""Checks of user input that commands and models run before loading or computing anything: finite numbers and
tensors, weights files.

Each raises an exception whose message names the input (`what`, e.g. `"--lora style.safetensors:nan"`), what was
expected and what was found, so that a command reports it as one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

_GIT_LFS_POINTER = b"version https://git-lfs"
_SNIFFED_BYTES = 64


def check_finite(what: str, value: object) -> float:
    """`value` as a float. Raises ValueError naming `what` if it is not a number, or is NaN or infinite."""
    try:
        number = float(value)  # pyright: ignore[reportArgumentType]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def check_finite_tensor(what: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming `what` and counting the NaN and infinite values, if the float `tensor` has any."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nans = int(torch.isnan(tensor).sum())
            raise ValueError(
                f"{what} has {nans} NaN and {int((~finite).sum()) - nans} infinite values out of {tensor.numel()}"
            )


def sniff_weights_format(path: Path) -> str:
    """What a weights file holds, from its first bytes: `"safetensors"`, `"torch-zip"` (`torch.save`'s zip
    archive), `"torch-pickle"` (the legacy `torch.save` format), `"git-lfs-pointer"` (a file git-lfs did not fetch)
    or `"unknown"`. Raises OSError if the file cannot be read."""
    with open(path, "rb") as file:
        head = file.read(_SNIFFED_BYTES)
        size = os.fstat(file.fileno()).st_size
    if head.startswith(_GIT_LFS_POINTER):
        return "git-lfs-pointer"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle's protocol opcode
        return "torch-pickle"
    if len(head) > 8:
        header_size = int.from_bytes(head[:8], "little")
        if 2 <= header_size <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def check_weights_file(what: str, path: str | os.PathLike[str]) -> str:
    """Check that `path` is a readable safetensors file or PyTorch checkpoint; returns its `sniff_weights_format`.

    Raises FileNotFoundError (missing), IsADirectoryError (a folder), PermissionError (unreadable) or ValueError (a
    git-lfs pointer, an empty file or other content), each naming `what` and the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder, not a weights file")
    try:
        kind = sniff_weights_format(path)
    except PermissionError:
        raise PermissionError(f"{what}: {path} is not readable (permission denied)") from None
    except OSError as error:
        raise OSError(f"{what}: cannot read {path}: {error.strerror or error}") from None
    if kind == "git-lfs-pointer":
        raise ValueError(f"{what}: {path} is a git-lfs pointer, not the weights it stands for: run `git lfs pull`")
    if kind == "unknown":
        empty = path.stat().st_size == 0
        raise ValueError(
            f"{what}: {path} is "
            + ("empty" if empty else "neither a safetensors file nor a PyTorch checkpoint (by its first bytes)")
        )
    return kind
