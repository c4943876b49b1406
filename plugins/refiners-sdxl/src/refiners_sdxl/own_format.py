"""The folders the SDXL models' `save_pretrained` write: one safetensors file per component (`unet.safetensors`,
`lda.safetensors`, `text_encoder_g.safetensors`...; each component's config in its metadata) and an index file that
tells which model wrote them (`refiners_sdxl.json`, `refiners_sdxl_refiner.json`) and its solver defaults."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refiners_sd15.loading import PretrainedComponent

BASE_OWN_INDEX = "refiners_sdxl.json"
"""The index `StableDiffusion_XL.save_pretrained` (and the inpainting model's) writes."""
REFINER_OWN_INDEX = "refiners_sdxl_refiner.json"
"""The index `StableDiffusion_XL_Refiner.save_pretrained` writes."""
SD15_OWN_INDEX = "refiners_sd15.json"
"""The index refiners-sd15's `StableDiffusion_1.save_pretrained` writes."""

OWN_INDEXES: dict[str, tuple[str, str]] = {
    BASE_OWN_INDEX: ("an SDXL base model", "StableDiffusion_XL"),
    REFINER_OWN_INDEX: ("an SDXL refiner", "StableDiffusion_XL_Refiner"),
    SD15_OWN_INDEX: ("a Stable Diffusion 1.5 model", "StableDiffusion_1"),
}
"""Index file -> (the model it tells, the class that loads it)."""


def check_own_index(folder: Path, own_index: str) -> None:
    """Raise ValueError naming the index file when `folder` holds a model that another class's `save_pretrained`
    wrote (any index of `OWN_INDEXES` but `own_index`), and which class loads it."""
    expected, _ = OWN_INDEXES[own_index]
    for index, (kind, loader) in OWN_INDEXES.items():
        if index != own_index and (folder / index).is_file():
            raise ValueError(
                f"{folder / index}: {kind} saved by {loader}.save_pretrained, not {expected}: load it with {loader}"
            )


def component_file(folder: Path, name: str) -> Path:
    """The file of the component `name` (`unet`, `lda`, `text_encoder_l`, `text_encoder_g`) in an own folder."""
    return folder / f"{name}.safetensors"


def write_own_folder(
    folder: Path, own_index: str, components: Mapping[str, PretrainedComponent], solver_defaults: dict[str, Any]
) -> None:
    """Save each of `components` to its `component_file` in `folder` (created if needed), then the index `own_index`
    (format `refiners-sdxl` or `refiners-sdxl-refiner`, the files, the solver defaults)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, component in components.items():
        component.save(component_file(folder, name))
    index = {
        "format": own_index.removesuffix(".json").replace("_", "-"),
        "components": {name: component_file(folder, name).name for name in components},
        "solver_defaults": solver_defaults,
    }
    (folder / own_index).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def read_own_solver_defaults(folder: Path, own_index: str) -> dict[str, Any]:
    """The solver defaults `write_own_folder` recorded in `folder / own_index`. Raises ValueError naming the index
    when it cannot be read or has none."""
    index_path = folder / own_index
    try:
        index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        solver_defaults = index["solver_defaults"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path}: cannot read the index written by save_pretrained: {error}") from error
    if not isinstance(solver_defaults, dict):
        raise ValueError(f"{index_path}: solver_defaults should be a JSON object, got {solver_defaults!r}")
    return solver_defaults  # pyright: ignore[reportUnknownVariableType]
