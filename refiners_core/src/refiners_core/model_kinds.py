"""Helpers for a `ModelSpec.detect`: tell a model's kind from the small files of a folder, a hub id or a weights file,
without reading weights or downloading anything.

A plugin's `detect(source)` looks at `model_index.json`, its own index, a component's `config.json` (`find_file`,
`read_json`) or a single file's tensor names (`weight_keys`: safetensors or torch checkpoints), and says what it
found; `refiners generate` asks every registered model this way which kind `--model` holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def find_file(source: str, filename: str, *, subfolder: str | None = None) -> Path | None:
    """`filename` (in `subfolder`) of the local folder `source`, or of the hub repository `source` when the hub's
    cache already holds it; None otherwise. Never downloads: a hub id not yet cached is unknown here."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local.joinpath(subfolder or "", filename)
        return path if path.is_file() else None
    if local.exists() or not source:
        return None
    from huggingface_hub import try_to_load_from_cache  # pyright: ignore[reportUnknownVariableType]

    try:
        cached = try_to_load_from_cache(source, filename if subfolder is None else f"{subfolder}/{filename}")
    except (ValueError, OSError):  # not a valid repository id
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_json(path: Path | None) -> dict[str, Any] | None:
    """The JSON object in the file at `path`, or None when there is no file or it holds no JSON object."""
    if path is None:
        return None
    try:
        content: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None  # pyright: ignore[reportUnknownVariableType]


TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""The suffixes of the torch checkpoints `weight_keys` reads the names of."""


def weight_keys(path: Path) -> list[str] | None:
    """The tensor names of the weights file at `path`, without reading a weight: a safetensors file's header, or a
    torch checkpoint (`TORCH_SUFFIXES`, in the zip format torch has saved since 1.6) loaded memory-mapped with
    `weights_only=True` (its `state_dict` entry unwrapped); None for another file or one that cannot be read so."""
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _torch_keys(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as file:  # pyright: ignore[reportUnknownVariableType]
            return list(file.keys())  # pyright: ignore[reportUnknownArgumentType, reportUnknownMemberType]
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for files that are not safetensors
        return None


def _torch_keys(path: Path) -> list[str] | None:
    import torch

    try:
        content: object = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many error types for files it cannot load memory-mapped
        return None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):  # pyright: ignore[reportUnknownMemberType]
        content = content["state_dict"]  # pyright: ignore[reportUnknownVariableType]
    if not isinstance(content, dict):
        return None
    return [key for key in content if isinstance(key, str)]  # pyright: ignore[reportUnknownVariableType]


def detect_model(source: str) -> tuple[str, str] | None:
    """The first registered model (`refiners_core.plugins.registry().models`) whose `detect` recognizes `source`, as
    `(name, what shows it)`, or None. A plugin's `detect` that raises only fails to recognize."""
    from refiners_core.plugins import registry

    for name, spec in registry().models.items():
        if spec.detect is None:
            continue
        try:
            why = spec.detect(source)
        except Exception:  # noqa: BLE001 - a plugin's detect that breaks its contract only fails to recognize
            continue
        if why is not None:
            return name, why
    return None
