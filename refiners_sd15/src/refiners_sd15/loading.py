"""Read Stable Diffusion 1.5 components from a diffusers folder, a hub repository or a single-file checkpoint.

The diffusers layout holds one folder per component (`unet/`, `vae/`, `text_encoder/`), each with a
`config.json` and its weights: `diffusion_pytorch_model.safetensors` (or `model.safetensors` for the text
encoder), `.bin` files for older repositories, `.fp16.` variants, and `*.index.json` for sharded weights.
Our own format is one safetensors file per component whose metadata records the component and its config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import torch
from torch import nn

from refiners_core.state_dicts import KeyMapping, load_state_dict_checked
from refiners_core.weights import WeightsError, load_tensors, resolve_path, save_tensors, shard_files

TModel = TypeVar("TModel", bound=nn.Module)
PathOrRepoId = str | os.PathLike[str]

FORMAT_KEY = "refiners.format"
COMPONENT_KEY = "refiners.component"
CONFIG_KEY = "refiners.config"
OUR_FORMAT = "refiners-sd15"


@dataclass(frozen=True)
class ComponentFormat:
    """How one component is stored in the diffusers layout and in the original single-file checkpoint."""

    name: str
    subfolder: str
    weight_stems: tuple[str, ...]
    config_to_kwargs: Callable[[dict[str, Any]], dict[str, Any]]
    diffusers_mapping: Callable[[dict[str, Any], Collection[str]], KeyMapping]
    single_file_prefix: str
    single_file_mapping: Callable[[dict[str, Any]], KeyMapping]
    architecture: Callable[[Any], dict[str, Any]]
    single_file_config: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] = lambda tensors: {}
    ignored_keys: frozenset[str] = frozenset()


class PretrainedComponent:
    """Mixin giving an SD1.5 component `from_pretrained` and `save` (our own format)."""

    component_format: ClassVar[ComponentFormat]

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: PathOrRepoId,
        *,
        subfolder: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
    ) -> Self:
        """Load from a diffusers folder or hub id (its component subfolder), or from a file written by `save`.

        `subfolder` defaults to the diffusers one (`unet`, `vae`, `text_encoder`); pass `""` for a folder that
        holds the component directly. Raises FileNotFoundError naming what is missing and WeightsError naming
        the file, key and layer at fault; nothing is half-loaded.
        """
        return load_component(
            cls,  # pyright: ignore[reportArgumentType]
            cls.component_format,
            path_or_repo_id,
            subfolder=subfolder,
            device=device,
            dtype=dtype,
            variant=variant,
            revision=revision,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights with our keys to one safetensors file, with the architecture in its metadata."""
        component = self.component_format
        save_own_format(self, component, path, component.architecture(self))  # pyright: ignore[reportArgumentType]


def load_component(
    model_class: type[TModel],
    component: ComponentFormat,
    path_or_repo_id: PathOrRepoId,
    *,
    subfolder: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> TModel:
    """Build `model_class` from a diffusers folder or hub id (the component's subfolder), or our own file."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_file():
        return load_own_format(model_class, component, local, device=device, dtype=dtype)
    folder_subpath = component.subfolder if subfolder is None else subfolder
    config_path = _find(path_or_repo_id, "config.json", subfolder=folder_subpath, revision=revision)
    kwargs = _kwargs_from_config(component, config_path) if config_path is not None else {}
    files = find_weight_files(path_or_repo_id, component, subfolder=folder_subpath, variant=variant, revision=revision)
    tensors = _read_all(files)
    return _build_and_load(
        model_class,
        kwargs,
        tensors,
        source=_describe(files),
        mapping=lambda model: component.diffusers_mapping(component.architecture(model), tensors.keys()),
        ignore=component.ignored_keys,
        device=device,
        dtype=dtype,
    )


def load_single_file_component(
    model_class: type[TModel],
    component: ComponentFormat,
    *,
    source: Path,
    tensors: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TModel:
    """Build one component from the tensors of an original single-file checkpoint (keys under its prefix)."""
    prefix = component.single_file_prefix
    own = {key: value for key, value in tensors.items() if key.startswith(prefix)}
    if not own:
        raise WeightsError(f"{source}: no '{prefix}*' keys, so no {component.name} in this checkpoint")
    kwargs = component.single_file_config({key.removeprefix(prefix): value for key, value in own.items()})
    return _build_and_load(
        model_class,
        kwargs,
        own,
        source=str(source),
        mapping=lambda model: {
            prefix + key: ours for key, ours in component.single_file_mapping(component.architecture(model)).items()
        },
        ignore={prefix + key for key in component.ignored_keys},
        device=device,
        dtype=dtype,
    )


def find_weight_files(
    path_or_repo_id: PathOrRepoId,
    component: ComponentFormat,
    *,
    subfolder: str,
    variant: str | None = None,
    revision: str | None = None,
) -> list[Path]:
    """The weight files of a component: safetensors first, then `.bin`; a sharded index expands to its shards.

    Raises FileNotFoundError naming the folder and every file name tried.
    """
    tried: list[str] = []
    for extension in (".safetensors", ".bin"):
        for stem in component.weight_stems:
            name = f"{stem}.{variant}{extension}" if variant else f"{stem}{extension}"
            for candidate in (name, f"{name}.index.json"):
                tried.append(candidate)
                path = _find(path_or_repo_id, candidate, subfolder=subfolder, revision=revision)
                if path is None:
                    continue
                if candidate.endswith(".index.json"):
                    return _shards(path_or_repo_id, path, subfolder=subfolder, revision=revision)
                return [path]
    where = f"{os.fspath(path_or_repo_id)}/{subfolder}" if subfolder else os.fspath(path_or_repo_id)
    raise FileNotFoundError(
        f"no {component.name} weights in {where} (looked for {', '.join(tried)})"
        + (f"; is the '{variant}' variant published there?" if variant else "")
    )


def save_own_format(model: nn.Module, component: ComponentFormat, path: PathOrRepoId, config: dict[str, Any]) -> None:
    """Write `model` to one safetensors file with our keys; its metadata records the component and config."""
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    metadata = {FORMAT_KEY: OUR_FORMAT, COMPONENT_KEY: component.name, CONFIG_KEY: json.dumps(config)}
    save_tensors(path, tensors, metadata=metadata)


def load_own_format(
    model_class: type[TModel],
    component: ComponentFormat,
    path: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TModel:
    """Read a file written by `save_own_format` (raises WeightsError for another component or format)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: expected a .safetensors file written by save_pretrained")
    try:
        with safe_open(path, framework="pt") as handle:  # pyright: ignore[reportUnknownVariableType]
            metadata: dict[str, str] = handle.metadata() or {}  # pyright: ignore[reportUnknownMemberType]
    except Exception as error:
        raise WeightsError(f"cannot read {path} as safetensors: {error}") from error
    if metadata.get(FORMAT_KEY) != OUR_FORMAT:
        raise WeightsError(
            f"{path} was not written by refiners-sd15 (no '{FORMAT_KEY}' metadata): pass a diffusers folder, "
            "a hub id, or use StableDiffusion_1.from_single_file for an original checkpoint"
        )
    if metadata.get(COMPONENT_KEY) != component.name:
        raise WeightsError(f"{path} holds a '{metadata.get(COMPONENT_KEY)}', not a '{component.name}'")
    kwargs: dict[str, Any] = json.loads(metadata[CONFIG_KEY])
    return _build_and_load(
        model_class,
        kwargs,
        load_tensors(path),
        source=str(path),
        mapping=lambda model: None,
        ignore=(),
        device=device,
        dtype=dtype,
    )


def _build_and_load(
    model_class: type[TModel],
    kwargs: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    mapping: Callable[[TModel], KeyMapping | None],
    ignore: Iterable[str],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> TModel:
    """Build the model and load `tensors` into it, holding the weights in memory only once.

    The model is built on the meta device (no time spent on a random initialisation) and takes the file's
    tensors as its own: safetensors files are memory-mapped, so a weight is read from disk when first used and
    is never copied unless its dtype or device changes. Buffers that no weights file provides (not in the
    `state_dict`) are recreated on the device when empty (they only carry a device and dtype); a model with a
    non-empty one is built normally instead, since those buffers must keep the values its constructor gives them.
    """
    model = model_class(**kwargs, device="meta", dtype=dtype)
    persistent = set(model.state_dict())
    extra_buffers = {name: buffer for name, buffer in model.named_buffers() if name not in persistent}
    if any(buffer.numel() for buffer in extra_buffers.values()):
        model = model_class(**kwargs, device=device, dtype=dtype)
        load_state_dict_checked(model, tensors, source=source, mapping=mapping(model), ignore=ignore)
        return model
    target = device if device is not None else "cpu"
    load_state_dict_checked(
        model, tensors, source=source, mapping=mapping(model), ignore=ignore, assign_to_device=target
    )
    for name, buffer in extra_buffers.items():
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(
            attribute, torch.empty(0, dtype=buffer.dtype, device=target), persistent=False
        )
    return model


def _kwargs_from_config(component: ComponentFormat, config_path: Path) -> dict[str, Any]:
    try:
        return component.config_to_kwargs(_read_json(config_path))
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error


def _find(path_or_repo_id: PathOrRepoId, filename: str, *, subfolder: str, revision: str | None) -> Path | None:
    try:
        return resolve_path(path_or_repo_id, filename, subfolder=subfolder or None, revision=revision)
    except FileNotFoundError:
        return None


def _shards(path_or_repo_id: PathOrRepoId, index: Path, *, subfolder: str, revision: str | None) -> list[Path]:
    return shard_files(index, find=lambda name: _find(path_or_repo_id, name, subfolder=subfolder, revision=revision))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read {path} as JSON: {error}") from error
    if not isinstance(content, dict):
        raise WeightsError(f"{path} should hold a JSON object")
    return content  # pyright: ignore[reportUnknownVariableType]


def _read_all(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_tensors(path))
    return tensors


def _describe(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
