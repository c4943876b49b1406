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
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

import torch
from torch import nn

from refiners_core.state_dicts import KeyMapping, load_state_dict_checked
from refiners_core.weights import (
    NotInHubCacheError,
    WeightsError,
    load_tensors,
    read_metadata,
    resolve_path,
    save_tensors,
    shard_files,
)

TModel = TypeVar("TModel", bound=nn.Module)
TConfig = TypeVar("TConfig")
PathOrRepoId = str | os.PathLike[str]

FORMAT_KEY = "refiners.format"
COMPONENT_KEY = "refiners.component"
CONFIG_KEY = "refiners.config"
OUR_FORMAT = "refiners-sd15"


@dataclass(frozen=True)
class ComponentFormat(Generic[TConfig]):
    """How one component is stored in the diffusers layout and in the original single-file checkpoint.

    `TConfig` is the component's config dataclass: the model is built as `model_class(config, device=, dtype=)`,
    and the mappings are computed from that config. Our own format stores `config_to_json(config)` and reads it
    back with `config_from_json`; by default the dataclass's fields, tuples written as JSON lists.
    `single_file_tensors`, when set, rewrites a single file's tensors (keys without the prefix, after
    `single_file_config` read them) into those `single_file_mapping` maps, e.g. splits fused projections into views.
    """

    name: str
    subfolder: str
    weight_stems: tuple[str, ...]
    config_class: type[TConfig]
    config_from_diffusers: Callable[[dict[str, Any]], TConfig]
    diffusers_mapping: Callable[[TConfig, Collection[str]], KeyMapping]
    single_file_prefix: str
    single_file_mapping: Callable[[TConfig], KeyMapping]
    single_file_config: Callable[[Mapping[str, torch.Tensor]], TConfig]
    ignored_keys: frozenset[str] = frozenset()
    config_to_json: Callable[[TConfig], dict[str, Any]] | None = None
    config_from_json: Callable[[dict[str, Any]], TConfig] | None = None
    single_file_tensors: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None

    def to_json(self, config: TConfig) -> dict[str, Any]:
        """The config as our own format's metadata stores it."""
        if self.config_to_json is not None:
            return self.config_to_json(config)
        return asdict(config)  # pyright: ignore[reportArgumentType]

    def from_json(self, values: dict[str, Any]) -> TConfig:
        """The config stored in our own format's metadata (fields left out take their defaults)."""
        if self.config_from_json is not None:
            return self.config_from_json(values)
        return config_from_dict(self.config_class, values)


def config_from_dict(config_class: type[TConfig], values: object) -> TConfig:
    """`config_class(**values)` for a JSON object of its fields (each checked by the config itself).

    Raises ValueError naming the field: one that `config_class` does not have, one it needs that is missing, or
    a bad value; and for `values` that are not a JSON object.
    """
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object of {config_class.__name__} fields, got {values!r}")
    given = cast(dict[str, Any], values)
    known = {field.name: field for field in fields(config_class)}  # pyright: ignore[reportArgumentType]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field {', '.join(map(repr, unknown))}")
    missing = [
        name
        for name, field in known.items()
        if name not in given and field.default is MISSING and field.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"the {config_class.__name__} field {', '.join(map(repr, missing))} is missing")
    return config_class(**given)


class PretrainedComponent(nn.Module):
    """Mixin giving an SD1.5 component `from_pretrained` and `save` (our own format).

    The component keeps the config it was built from as `config`.
    """

    component_format: ClassVar[ComponentFormat[Any]]
    config: Any

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
        mmap: bool = False,
    ) -> Self:
        """Load from a diffusers folder or hub id (its component subfolder), or from a file written by `save`.

        `subfolder` defaults to the diffusers one (`unet`, `vae`, `text_encoder`); pass `""` for a folder that
        holds the component directly. The weights are copied into memory, or with `mmap=True` memory-mapped from
        the files, which must then stay unchanged while the model lives (`refiners_core.weights`). Raises
        FileNotFoundError naming what is missing (the folder, its `config.json`, its weights; `NotInHubCacheError`
        for a hub id missing from the cache while offline) and WeightsError naming the file and the config field,
        key or layer at fault; nothing is half-loaded.
        """
        return load_component(
            cls,
            cls.component_format,
            path_or_repo_id,
            subfolder=subfolder,
            device=device,
            dtype=dtype,
            variant=variant,
            revision=revision,
            mmap=mmap,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights with our keys to one safetensors file, with the config in its metadata."""
        component = self.component_format
        save_own_format(self, component, path, component.to_json(self.config))


def load_component(
    model_class: type[TModel],
    component: ComponentFormat[Any],
    path_or_repo_id: PathOrRepoId,
    *,
    subfolder: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    mmap: bool = False,
) -> TModel:
    """Build `model_class` from a diffusers folder or hub id (the component's subfolder), or our own file; with
    `mmap`, the weights memory-mapped from the files (`load_tensors`)."""
    local = Path(path_or_repo_id).expanduser()
    if local.is_file():
        return load_own_format(model_class, component, local, device=device, dtype=dtype, mmap=mmap)
    located = locate_component(component, path_or_repo_id, subfolder=subfolder, variant=variant, revision=revision)
    return load_located(model_class, located, device=device, dtype=dtype, mmap=mmap)


@dataclass(frozen=True)
class LocatedComponent(Generic[TConfig]):
    """A component of a diffusers folder or hub id, ready to load: its config read and checked, its weight files
    found (a shard index checked against its shards), no weights read yet."""

    component: ComponentFormat[TConfig]
    config: TConfig
    files: list[Path]


def locate_component(
    component: ComponentFormat[TConfig],
    path_or_repo_id: PathOrRepoId,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> LocatedComponent[TConfig]:
    """Read the config and find the weight files of a component (`subfolder`: the diffusers one by default).

    A pipeline locates all its components before loading any, so that a missing or bad one is reported before the
    others' weights are read. Raises FileNotFoundError naming the missing folder, config.json or weights
    (`NotInHubCacheError` for a hub id missing from the cache while offline), WeightsError naming the file and the
    field of a bad config or the shard index at fault.
    """
    local = Path(path_or_repo_id).expanduser()
    folder_subpath = component.subfolder if subfolder is None else subfolder
    where = _where(path_or_repo_id, folder_subpath)
    if local.is_dir() and not (local / folder_subpath).is_dir():
        raise FileNotFoundError(
            f"no {where} folder, so no {component.name}: a diffusers folder holds one folder per component "
            "(unet/, vae/, text_encoder/)"
        )
    config_path = _find(path_or_repo_id, "config.json", subfolder=folder_subpath, revision=revision)
    if config_path is None:
        raise FileNotFoundError(
            f"no config.json in {where}: the {component.name}'s architecture is read from it, not guessed"
        )
    config = _config_from_diffusers(component, config_path)
    files = find_weight_files(path_or_repo_id, component, subfolder=folder_subpath, variant=variant, revision=revision)
    return LocatedComponent(component, config, files)


def load_located(
    model_class: type[TModel],
    located: LocatedComponent[Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> TModel:
    """Read the weights of a located component and build `model_class` with them (all or nothing); with `mmap`,
    the weights memory-mapped from the files (`load_tensors`)."""
    tensors = _read_all(located.files, mmap=mmap)
    return _build_and_load(
        model_class,
        located.config,
        tensors,
        source=_describe(located.files),
        mapping=lambda model: located.component.diffusers_mapping(model.config, tensors.keys()),
        ignore=located.component.ignored_keys,
        device=device,
        dtype=dtype,
    )


def read_component_config(
    component: ComponentFormat[TConfig],
    path_or_repo_id: PathOrRepoId,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
) -> TConfig:
    """The config of a component of a diffusers folder or hub id, read from its `config.json` without its weights.

    `subfolder` defaults to the component's diffusers one. Raises FileNotFoundError naming the component and the
    folder when there is no `config.json`, and ValueError naming the file and field for an unsupported config.
    """
    folder_subpath = component.subfolder if subfolder is None else subfolder
    config_path = _find(path_or_repo_id, "config.json", subfolder=folder_subpath, revision=revision)
    if config_path is None:
        where = f"{os.fspath(path_or_repo_id)}/{folder_subpath}" if folder_subpath else os.fspath(path_or_repo_id)
        raise FileNotFoundError(f"no {component.name} in {where}: it has no config.json")
    return _config_from_diffusers(component, config_path)


def read_single_file_config(
    component: ComponentFormat[TConfig], *, source: Path, tensors: Mapping[str, torch.Tensor]
) -> TConfig:
    """The config of one component of an original single-file checkpoint, read from the shapes of the tensors under
    its prefix (no weight is read: check components against each other before loading any). Raises WeightsError
    naming `source` when no key has the prefix or the shapes do not describe a supported config."""
    prefix = component.single_file_prefix
    unprefixed = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
    if not unprefixed:
        raise WeightsError(f"{source}: no '{prefix}*' keys, so no {component.name} in this checkpoint")
    try:
        return component.single_file_config(unprefixed)
    except ValueError as error:
        raise WeightsError(f"{source}: the {component.name} under '{prefix}': {error}") from error


def load_single_file_component(
    model_class: type[TModel],
    component: ComponentFormat[Any],
    *,
    source: Path,
    tensors: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TModel:
    """Build one component from the tensors of an original single-file checkpoint (keys under its prefix)."""
    prefix = component.single_file_prefix
    config = read_single_file_config(component, source=source, tensors=tensors)
    own = {key: value for key, value in tensors.items() if key.startswith(prefix)}
    unprefixed = {key.removeprefix(prefix): value for key, value in own.items()}
    if component.single_file_tensors is not None:
        own = {prefix + key: value for key, value in component.single_file_tensors(unprefixed).items()}
    return _build_and_load(
        model_class,
        config,
        own,
        source=str(source),
        mapping=lambda model: {prefix + key: ours for key, ours in component.single_file_mapping(model.config).items()},
        ignore={prefix + key for key in component.ignored_keys},
        device=device,
        dtype=dtype,
    )


def find_weight_files(
    path_or_repo_id: PathOrRepoId,
    component: ComponentFormat[Any],
    *,
    subfolder: str,
    variant: str | None = None,
    revision: str | None = None,
) -> list[Path]:
    """The weight files of a component: safetensors first, then `.bin`; a sharded index expands to its shards.

    Raises FileNotFoundError naming the folder and every file name tried (`NotInHubCacheError` when the hub
    could not be asked for them).
    """
    tried: list[str] = []
    cache_miss: NotInHubCacheError | None = None
    for extension in (".safetensors", ".bin"):
        for stem in component.weight_stems:
            name = f"{stem}.{variant}{extension}" if variant else f"{stem}{extension}"
            for candidate in (name, f"{name}.index.json"):
                tried.append(candidate)
                try:
                    path = _find(path_or_repo_id, candidate, subfolder=subfolder, revision=revision)
                except NotInHubCacheError as error:
                    cache_miss = cache_miss or error
                    continue
                if path is None:
                    continue
                if candidate.endswith(".index.json"):
                    return _shards(path_or_repo_id, path, subfolder=subfolder, revision=revision)
                return [path]
    if cache_miss is not None:
        raise cache_miss
    raise FileNotFoundError(
        f"no {component.name} weights in {_where(path_or_repo_id, subfolder)} (looked for {', '.join(tried)})"
        + (f"; is the '{variant}' variant published there?" if variant else "")
    )


def save_own_format(
    model: nn.Module, component: ComponentFormat[Any], path: PathOrRepoId, config: dict[str, Any]
) -> None:
    """Write `model` to one safetensors file with our keys; its metadata records the component and config."""
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    metadata = {FORMAT_KEY: OUR_FORMAT, COMPONENT_KEY: component.name, CONFIG_KEY: json.dumps(config)}
    save_tensors(path, tensors, metadata=metadata)


def load_own_format(
    model_class: type[TModel],
    component: ComponentFormat[Any],
    path: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = False,
) -> TModel:
    """Read a file written by `save_own_format`, told by its content, whatever its name (raises WeightsError for
    another component or format); with `mmap`, its weights memory-mapped (`load_tensors`)."""
    config = read_own_config(component, path)
    return _build_and_load(
        model_class,
        config,
        load_tensors(path, mmap=mmap),
        source=str(path),
        mapping=lambda model: None,
        ignore=(),
        device=device,
        dtype=dtype,
    )


def read_own_config(component: ComponentFormat[TConfig], path: Path) -> TConfig:
    """The config of a component file written by `save_own_format`, from its metadata (no weight is read). Raises
    WeightsError naming the file for another format or component, or a missing or bad config."""
    metadata = read_metadata(path)
    if metadata.get(FORMAT_KEY) != OUR_FORMAT:
        raise WeightsError(
            f"{path} was not written by refiners-sd15 (no '{FORMAT_KEY}' metadata): pass a diffusers folder, "
            "a hub id, or use StableDiffusion_1.from_single_file for an original checkpoint"
        )
    if metadata.get(COMPONENT_KEY) != component.name:
        raise WeightsError(f"{path} holds a '{metadata.get(COMPONENT_KEY)}', not a '{component.name}'")
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: no '{CONFIG_KEY}' metadata, which holds the {component.name}'s config")
    try:
        values: object = json.loads(metadata[CONFIG_KEY])
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object of {component.config_class.__name__} fields, got {values!r}")
        config = component.from_json(cast(dict[str, Any], values))
    except RecursionError as error:
        raise WeightsError(f"{path}: the '{CONFIG_KEY}' metadata is nested too deeply") from error
    except ValueError as error:
        raise WeightsError(f"{path}: the '{CONFIG_KEY}' metadata: {error}") from error
    return config


@torch.inference_mode(False)
def _build_and_load(
    model_class: type[TModel],
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str,
    mapping: Callable[[TModel], KeyMapping | None],
    ignore: Iterable[str],
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> TModel:
    """Build the model from `config` and load `tensors` into it, holding the weights in memory only once.

    The model is built on the meta device (no time spent on a random initialisation) and takes the loaded tensors
    as its own (`load_tensors` copies a file into the process's memory once, or maps it with `mmap=True`; a weight
    is not copied again unless its dtype or device changes). Buffers that no weights file provides (not in the
    `state_dict`) are recreated on the device when empty (they only carry a device and dtype); a model with a
    non-empty one is built normally instead, since those buffers must keep the values its constructor gives them.
    Outside inference mode even when called under it: the parameters and buffers are normal tensors (they have
    version counters, which the cross-attentions' key and value reuse and DoRA's cache rely on, and can be trained).
    """
    model = _build(model_class, config, device="meta", dtype=dtype)
    persistent = set(model.state_dict())
    extra_buffers = {name: buffer for name, buffer in model.named_buffers() if name not in persistent}
    if any(buffer.numel() for buffer in extra_buffers.values()):
        model = _build(model_class, config, device=device, dtype=dtype)
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


def _build(
    model_class: type[TModel], config: Any, *, device: torch.device | str | None, dtype: torch.dtype | None
) -> TModel:
    return model_class(config, device=device, dtype=dtype)


def _config_from_diffusers(component: ComponentFormat[TConfig], config_path: Path) -> TConfig:
    content = read_json_object(config_path)
    try:
        return component.config_from_diffusers(content)
    except ValueError as error:
        raise WeightsError(f"{config_path}: {error}") from error


def _where(path_or_repo_id: PathOrRepoId, subfolder: str) -> str:
    return f"{os.fspath(path_or_repo_id)}/{subfolder}" if subfolder else os.fspath(path_or_repo_id)


def _find(path_or_repo_id: PathOrRepoId, filename: str, *, subfolder: str, revision: str | None) -> Path | None:
    """The file's local path, None if it is not there (a hub file missing from the cache while offline raises
    NotInHubCacheError: it may well be there)."""
    try:
        return resolve_path(path_or_repo_id, filename, subfolder=subfolder or None, revision=revision)
    except NotInHubCacheError:
        raise
    except FileNotFoundError:
        return None


def _shards(path_or_repo_id: PathOrRepoId, index: Path, *, subfolder: str, revision: str | None) -> list[Path]:
    return shard_files(index, find=lambda name: _find(path_or_repo_id, name, subfolder=subfolder, revision=revision))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""The `prediction_type` values of a diffusers scheduler config that our solvers read."""


def read_scheduler_config(
    path_or_repo_id: PathOrRepoId, *, revision: str | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The path and content of `scheduler/scheduler_config.json` in a diffusers folder or hub repository, or None
    when there is none (our solvers then keep their own settings). Raises WeightsError naming a file that is not a
    JSON object."""
    try:
        path = resolve_path(path_or_repo_id, "scheduler_config.json", subfolder="scheduler", revision=revision)
    except FileNotFoundError:
        return None
    return path, read_json_object(path)


def scheduler_prediction_type(path: Path, config: dict[str, Any]) -> str:
    """The `prediction_type` of the scheduler config `config` read from `path` (diffusers' default "epsilon" when
    it has none). Raises ValueError naming the file for a value our solvers do not read."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        expected = ", ".join(repr(value) for value in PREDICTION_TYPES[:-1]) + f" or {PREDICTION_TYPES[-1]!r}"
        raise ValueError(f"{path}: prediction_type is {prediction_type!r}, our solvers read {expected}")
    return prediction_type


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file at `path` (a config, an index). Raises WeightsError (a ValueError) naming the file
    when it cannot be read, is not JSON or holds something else than an object."""
    try:
        content: object = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise WeightsError(f"cannot read {path} as JSON: {error}") from error
    if not isinstance(content, dict):
        raise WeightsError(f"{path} should hold a JSON object")
    return content  # pyright: ignore[reportUnknownVariableType]


def _read_all(files: Iterable[Path], *, mmap: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_tensors(path, mmap=mmap))
    return tensors


def _describe(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
