"""Helpers for tests of refiners-training: small image datasets and TOML configurations of training runs (the small
SD1.5 folder they train is `refiners_sd15.testing.DiffusersReferences`'s). Nothing here is used at runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

RED = (230, 30, 30)
"""The colour of `write_colour_patches`' images."""


def write_colour_patches(folder: Path, count: int = 3, scale: int = 1) -> Path:
    """`count` images of the same red patch at different sizes (`scale` times (16 + 4i) x (16 or 24) pixels, so
    resizing and cropping apply), one caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (scale * (16 + 4 * index), scale * (16 + 8 * (index % 2)))
        Image.new("RGB", size, RED).save(folder / f"patch-{index}.png")
        (folder / f"patch-{index}.txt").write_text("a red square", encoding="utf-8")
    return folder


def toml_config(model: Path, data: Path, output_dir: Path, /, **sections: dict[str, Any]) -> str:
    """A TOML configuration for the small model and dataset; `sections` add or replace keys per section."""
    values: dict[str, dict[str, Any]] = {
        "model": {"base": str(model)},
        "data": {"path": str(data), "resolution": 16},
        "training": {"output_dir": str(output_dir)},
    }
    for name, keys in sections.items():
        values.setdefault(name, {}).update(keys)
    lines: list[str] = []
    for name, keys in values.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"
