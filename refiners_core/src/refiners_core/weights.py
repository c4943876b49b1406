"""Read and write weight files, and find them locally or on the Hugging Face Hub.

Weights are read with `safetensors`, or for `.pth/.pt/.ckpt/.bin` files with `torch.load(weights_only=True)`,
which refuses pickles that would run code. Writes are atomic: a failed save leaves any existing file as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file  # pyright: ignore[reportUnknownVariableType]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class WeightsError(ValueError):
    """A file could not be read or written as weights; the message names the file."""


def load_tensors(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the tensors of a `.safetensors`, `.pth`, `.pt`, `.ckpt` or `.bin` file onto `device`.

    A torch checkpoint that wraps its tensors in a `"state_dict"` entry is unwrapped. Raises FileNotFoundError
    if the file does not exist, WeightsError if it is not a weights file of a known kind (truncated, text, a
    pickle of anything but tensors...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(path, device=str(device))
        except Exception as error:
            raise WeightsError(f"cannot read {path} as safetensors: {error}") from error
    if suffix in TORCH_SUFFIXES:
        try:
            checkpoint: object = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:
            raise WeightsError(f"cannot read {path} as a torch checkpoint of tensors: {error}") from error
        return _tensors_of(checkpoint, path)
    known = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
    raise WeightsError(f"cannot read {path}: unknown weights file extension {path.suffix!r} (expected {known})")


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (and string `metadata`) to a `.safetensors` file, atomically.

    The data goes to a temporary file in the same folder, is flushed to disk, then replaces `path`: on any
    failure an existing file at `path` is left untouched and no temporary file remains. Raises WeightsError
    if `path` does not end in `.safetensors` or the tensors cannot be saved (e.g. they share memory), OSError
    if the folder cannot be written.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise WeightsError(f"cannot write {path}: save_tensors writes safetensors, use a {SAFETENSORS_SUFFIX} path")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise WeightsError(f"cannot write {path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(dict(tensors), temp_name, metadata=dict(metadata) if metadata is not None else None)
        with open(temp_name, "rb+") as temp_file:
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise WeightsError(f"cannot write {path}: {error}") from error
        raise
    _fsync_folder(path.parent)


def resolve_path(
    path_or_repo_id: str | os.PathLike[str],
    filename: str | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
) -> Path:
    """The local path of a file or folder, given a local path or a Hugging Face Hub repository id.

    A local file or folder is used as it is (joined with `subfolder` and `filename` when given). Anything else
    is taken as a hub repository id: with `filename`, that file is fetched with `hf_hub_download`, otherwise
    the repository (or only its `subfolder`) with `snapshot_download`. Both use the hub's cache and honour
    `HF_HUB_OFFLINE`. Raises FileNotFoundError, naming the path or repository id, when nothing is found, and
    ValueError for an empty string.
    """
    if not os.fspath(path_or_repo_id):
        raise ValueError("resolve_path needs a local path or a hub repository id, got an empty string")
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        resolved = local.joinpath(subfolder or "", filename or "")
        if not resolved.exists():
            raise FileNotFoundError(f"no {resolved.relative_to(local)} in {local}")
        return resolved
    if not isinstance(path_or_repo_id, str):
        raise FileNotFoundError(f"no such file or folder: {local}")
    return _download(path_or_repo_id, filename, revision=revision, subfolder=subfolder)


def _download(repo_id: str, filename: str | None, *, revision: str | None, subfolder: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download  # pyright: ignore[reportUnknownVariableType]
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{subfolder}/{filename}" if subfolder and filename else filename or subfolder
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision))
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=f"{subfolder}/*" if subfolder else None)
    except (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    ) as error:
        at = f" at revision {revision!r}" if revision else ""
        target = f"{what!r} in " if what else ""
        message = " ".join(str(error).split())
        raise FileNotFoundError(
            f"cannot find {target}{repo_id!r}{at}: there is no such local file or folder, and the Hugging Face "
            f"Hub lookup failed: {message}"
        ) from error
    resolved = Path(folder, subfolder or "")
    if not resolved.is_dir():
        raise FileNotFoundError(f"no folder {subfolder!r} in hub repository {repo_id!r} ({folder})")
    return resolved


def _tensors_of(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    entries = cast(dict[Any, Any], checkpoint)
    if isinstance(entries.get("state_dict"), dict):
        entries = cast(dict[Any, Any], entries["state_dict"])
    tensors: dict[str, torch.Tensor] = {}
    for name, value in entries.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path} is not a dict of tensors: entry {name!r} is a {type(value).__name__}")
        tensors[name] = value
    return tensors


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX only: folders cannot be opened on Windows)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
