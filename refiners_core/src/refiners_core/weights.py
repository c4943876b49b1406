"""Read and write weight files, check the weights they hold, and find them locally or on the Hugging Face Hub.

Weights are read with our safetensors reader, or for torch files with `torch.load(weights_only=True)`, which refuses
pickles that would run code; a file's kind is told from its first bytes, not its name. Writes are atomic: a failed
save leaves any existing file as it was.

Two contracts for loaded tensors, chosen by `load_tensors`'s `mmap` (and every `from_pretrained(..., mmap=...)` that
calls it), as with `torch.load(mmap=...)`:

- `mmap=False`, the default: copy-on-load. The tensors live in the process's own memory, read into one buffer; no
  file stays memory-mapped, so changing, truncating or deleting a file after loading neither changes the loaded
  weights nor crashes the process. Each weight is held once.
- `mmap=True`: the tensors of a safetensors file (and of a torch zip archive) are views of a private memory mapping
  of the file, read from the page cache when first used: no copy, a faster load, the pages shared with the cache
  and with other processes mapping the same file. The file must then not be changed, truncated or deleted while
  the tensors (the model) live: truncating it kills the process with SIGBUS at the next read of a weight, and
  overwriting it in place changes the weights. A tensor that is converted (another dtype, another device) is a
  copy anyway, and keeps no mapping.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

import torch
from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]

from refiners_core.weight_formats import (
    MAX_INFLATION,
    MAX_PICKLE_BYTES,
    READER_THREADS,
    WeightsError,
    inspect_torch_archive,
    map_safetensors,
    read_safetensors,
    read_safetensors_header,
    sniff,
    torch_archive_is_stored,
)

_PARALLEL_SCAN_BYTES = 64 * 2**20
"""Below this many bytes of weights, `check_weights` reads them in the calling thread."""

__all__ = [
    "MAX_INFLATION",
    "MAX_PICKLE_BYTES",
    "SAFETENSORS_SUFFIX",
    "NotInHubCacheError",
    "TORCH_SUFFIXES",
    "WeightsError",
    "check_weights",
    "load_tensors",
    "read_metadata",
    "read_safetensors_shapes",
    "resolve_path",
    "save_tensors",
    "shard_files",
]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class NotInHubCacheError(FileNotFoundError):
    """A path that is no local file or folder, read as a Hugging Face Hub repository id, whose file is not in the
    hub cache while the hub cannot be asked for it (`HF_HUB_OFFLINE=1`, or no network). The message says where the
    cache is and how to fill it. Raised by `resolve_path`; a loader that tries several names passes it on when
    none is found, instead of reporting the names as absent from the repository."""


@torch.inference_mode(False)
def load_tensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, torch.Tensor]:
    """Read the tensors of a `.safetensors`, `.pth`, `.pt`, `.ckpt` or `.bin` file onto `device`.

    The content decides how the file is read (a safetensors file named `.pth` is read as safetensors). A torch
    checkpoint that wraps its tensors in a `"state_dict"` entry is unwrapped; one whose entries are dicts of tensors
    (IP-Adapter's `{"image_proj": {...}, "ip_adapter": {...}}`) is flattened, keys joined by "." (`image_proj.x`).

    By default the tensors are copies in this process's memory, read into one buffer (the weights are held once; see
    `weight_formats.read_safetensors`): the file is closed and unmapped on return, and whatever happens to it
    afterwards does not reach them. With `mmap=True` (see the module doc) the tensors of a safetensors file are views
    of one private mapping of it (`weight_formats.map_safetensors`; the header is checked first, with the same
    errors), and those of a torch zip archive whose entries are stored uncompressed come from
    `torch.load(mmap=True)`; the file must then stay as it is while they live: truncated, it kills the process with
    SIGBUS, overwritten in place, it changes them. A legacy (non-zip) or compressed torch file, or a safetensors
    tensor not aligned to its element size in the file, is copied all the same; so is every tensor when `device` is
    not the CPU (the mapping is then dropped on return). The tensors are normal ones even when this is called under
    `torch.inference_mode()`: they have version counters (so caches keyed on them see in-place changes) and can be
    trained.

    Raises FileNotFoundError if the file does not exist, WeightsError naming the file if it is not a weights file of
    a known kind (truncated, text, a git-lfs pointer, a pickle of anything but tensors...) or is a torch archive
    whose entries inflate to more than the tensors they declare (`MAX_PICKLE_BYTES`, `MAX_INFLATION`). The dtypes
    and values are not checked here: see `check_weights`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    if not path.is_file():
        raise WeightsError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in TORCH_SUFFIXES:
        known = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
        raise WeightsError(f"cannot read {path}: unknown weights file extension {path.suffix!r} (expected {known})")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            kind = sniff(file, size)
            if kind == "safetensors" or (kind == "unknown" and suffix == SAFETENSORS_SUFFIX):
                tensors, _ = (map_safetensors if mmap else read_safetensors)(file, size, path)
                return tensors if torch.device(device).type == "cpu" else _moved(tensors, device)
            if kind == "torch-zip":
                inspect_torch_archive(file, path)
                mapped = mmap and torch_archive_is_stored(file)
                file.seek(0)
                return _tensors_of(_torch_load(path if mapped else file, path, device, mmap=mapped), path)
            if kind == "torch-legacy":
                return _tensors_of(_torch_load(file, path, device), path)
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {error}") from error
    raise WeightsError(f"cannot read {path}: {_not_weights(kind, size)}")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a weights file, from its header only: a safetensors file's `__metadata__` (told by
    its content, whatever its name), or `{}` for a torch checkpoint, which has none.

    Raises FileNotFoundError if the file does not exist, WeightsError naming the file for a malformed safetensors
    header or a file that is no weights file (a git-lfs pointer, an empty file, text...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            kind = sniff(file, size)
            if kind == "safetensors" or (kind == "unknown" and path.suffix.lower() == SAFETENSORS_SUFFIX):
                return read_safetensors_header(file, size, path)[1]
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {error}") from error
    if kind in ("torch-zip", "torch-legacy"):
        return {}
    raise WeightsError(f"cannot read {path}: {_not_weights(kind, size)}")


def read_safetensors_shapes(
    path: str | os.PathLike[str], *, read_up_to: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of the safetensors file at `path` as meta tensors (dtype and shape from its header), except those of
    at most `read_up_to` elements (a LoRA's alphas), read from the file; and its metadata. Nothing else is read: a
    file of gigabytes is inspected in the time its header takes.

    Raises FileNotFoundError if the file does not exist, WeightsError naming the file if it is not a safetensors file
    (by its first bytes) or its header is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            kind = sniff(file, size)
            if kind != "safetensors":
                reason = "it is a torch checkpoint" if kind.startswith("torch") else _not_weights(kind, size)
                raise WeightsError(f"{path} is not a safetensors file: {reason}")
            entries, metadata, data_start = read_safetensors_header(file, size, path)
            tensors: dict[str, torch.Tensor] = {}
            for entry in entries:
                if math.prod(entry.shape) > read_up_to:
                    tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
                    continue
                file.seek(data_start + entry.begin)
                data = bytearray(file.read(entry.end - entry.begin))
                tensor = (
                    torch.frombuffer(data, dtype=entry.dtype).clone() if data else torch.empty(0, dtype=entry.dtype)
                )
                tensors[entry.name] = tensor.view(entry.shape)
    except OSError as error:
        raise WeightsError(f"cannot read {path}: {error}") from error
    return {name: tensors[name] for name in sorted(tensors)}, metadata


def _not_weights(kind: str, size: int) -> str:
    if kind == "git-lfs":
        return (
            f"it is a git-lfs pointer ({size} bytes), not the weights: fetch the file itself (`git lfs pull`, or "
            "download it from the hub)"
        )
    return "the file is empty" if kind == "empty" else "it is neither safetensors nor a torch checkpoint"


def check_weights(tensors: Mapping[str, torch.Tensor], *, source: str, keys: Collection[str] | None = None) -> None:
    """Raise WeightsError unless each tensor of `tensors` (those of `keys` only, if given) is a floating-point tensor
    with only finite values: an integer, bool or complex tensor is refused, never cast, and so is a NaN or an
    infinity. The message names `source` (the file), the key and the dtype or the bad value.

    Every loader calls it on the tensors it uses as float weights; it reads each tensor once (its sum, see
    `_first_non_finite`), in `READER_THREADS` threads when there is much to read.
    """
    checked = list(tensors if keys is None else keys)
    non_finite = _scan_non_finite({key: tensors[key] for key in checked})
    for key in checked:
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise WeightsError(f"{source}: '{key}' is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise WeightsError(
                f"{source}: '{key}' holds {str(tensor.dtype).removeprefix('torch.')} values, expected floating-point "
                "weights (they are refused, not converted)"
            )
        bad = non_finite[key]
        if bad is not None:
            raise WeightsError(f"{source}: '{key}' holds {bad} values; weights must be finite numbers")


def _scan_non_finite(tensors: Mapping[str, object]) -> dict[str, str | None]:
    """`_first_non_finite` of each floating-point tensor of `tensors` (None for anything else, which the caller
    refuses). Reading the weights is most of a memory-mapped load's time, and a tensor's sum releases the GIL: past
    `_PARALLEL_SCAN_BYTES` the tensors are split by size between `READER_THREADS` threads."""
    floating = {
        key: tensor
        for key, tensor in tensors.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
    }
    results: dict[str, str | None] = dict.fromkeys(tensors)
    sizes = {key: tensor.numel() * tensor.element_size() for key, tensor in floating.items()}
    if sum(sizes.values()) < _PARALLEL_SCAN_BYTES:
        results.update((key, _first_non_finite(tensor)) for key, tensor in floating.items())
        return results
    groups: list[list[str]] = [[] for _ in range(READER_THREADS)]
    loads = [0] * READER_THREADS
    for key in sorted(floating, key=sizes.__getitem__, reverse=True):  # the biggest first, to the lightest group
        lightest = loads.index(min(loads))
        groups[lightest].append(key)
        loads[lightest] += sizes[key]

    def scan(group: list[str]) -> dict[str, str | None]:
        return {key: _first_non_finite(floating[key]) for key in group}

    with ThreadPoolExecutor(READER_THREADS) as pool:
        for found in pool.map(scan, groups):
            results.update(found)
    return results


def _first_non_finite(tensor: torch.Tensor) -> str | None:
    """ "NaN" or "infinite" if `tensor` holds such a value, else None.

    First the sum, one fast pass: a NaN or an infinity makes it NaN or infinite, so a finite sum proves every value
    finite. Only a sum that is not finite (a bad value, or finite values whose sum overflows) costs the exact check,
    `torch.isfinite`, about ten times slower.
    """
    if tensor.element_size() == 1:  # float8: no isfinite, no sum
        tensor = tensor.float()
    accumulator = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(tensor.sum(dtype=accumulator).isfinite()) or bool(torch.isfinite(tensor).all()):
        return None
    return "NaN" if bool(torch.isnan(tensor).any()) else "infinite"


def shard_files(index: str | os.PathLike[str], *, find: Callable[[str], Path | None] | None = None) -> list[Path]:
    """The shards of a sharded checkpoint, checked against its index (`*.safetensors.index.json` or `*.bin.index.json`).

    The index's `weight_map` maps each key to the shard holding it; `find(name)` gives the local path of the shard
    `name` (by default the file beside the index), or None if it is missing. Every shard's keys are read (its header
    or its pickle, not its tensors) and must be exactly those the index assigns to it.

    Raises WeightsError naming the index and the shards (and keys) at fault: an index that is not a JSON object with
    a `weight_map` of strings, a shard path that is absolute or leaves the index's folder (`../x.safetensors`), a key
    present in a shard the index does not assign it to, a key present in two shards, an index entry for a key its
    shard lacks. Raises FileNotFoundError naming the index and shard when a shard is missing.
    """
    index = Path(index)
    weight_map = _weight_map(index)
    shards: dict[str, Path] = {}
    for name in sorted(set(weight_map.values())):
        parts = PurePosixPath(name).parts
        if (
            not parts
            or PurePosixPath(name).is_absolute()
            or ".." in parts
            or "\\" in name
            or re.match(r"^[A-Za-z]:", name)
        ):
            raise WeightsError(f"{index}: the shard path {name!r} leaves the index's folder: refused")
        shard = find(name) if find is not None else index.parent / name
        if shard is None or not shard.is_file():
            raise FileNotFoundError(f"{index} lists the shard {name}, which is missing")
        shards[name] = shard
    seen: dict[str, str] = {}
    for name, shard in shards.items():
        for key in _shard_keys(shard):
            if key in seen:
                raise WeightsError(f"{index}: '{key}' is in two shards, {seen[key]} and {name}")
            seen[key] = name
            assigned = weight_map.get(key)
            if assigned != name:
                where = f"assigns it to {assigned}" if assigned is not None else "does not list it"
                raise WeightsError(f"{index}: '{key}' is in the shard {name}, but the index {where}")
    for key, name in weight_map.items():
        if key not in seen:
            raise WeightsError(f"{index}: the index puts '{key}' in the shard {name}, which does not hold it")
    return list(shards.values())


def _weight_map(index: Path) -> dict[str, str]:
    try:
        content: object = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise WeightsError(f"cannot read {index} as JSON: {error}") from error
    weight_map = cast(dict[str, Any], content).get("weight_map") if isinstance(content, dict) else None
    if not weight_map or not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: has no 'weight_map' object")
    entries = cast(dict[Any, Any], weight_map)
    for key, name in entries.items():
        if not isinstance(key, str) or not isinstance(name, str) or not name:
            raise WeightsError(f"{index}: its weight_map entry {key!r}: {name!r} does not name a shard file")
    return cast(dict[str, str], entries)


def _shard_keys(shard: Path) -> list[str]:
    """The keys of a shard, from its safetensors header or its torch pickle (no tensor is read)."""
    try:
        with open(shard, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            kind = sniff(file, size)
            if kind == "safetensors":
                return [entry.name for entry in read_safetensors_header(file, size, shard)[0]]
            if kind == "torch-zip":
                return inspect_torch_archive(file, shard)[0]
    except OSError as error:
        raise WeightsError(f"cannot read {shard}: {error}") from error
    return list(load_tensors(shard))


def _moved(tensors: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def _torch_load(source: BinaryIO | Path, path: Path, device: str | torch.device, *, mmap: bool = False) -> object:
    """`torch.load(source, weights_only=True)`; with `mmap`, `source` is the path (torch maps only paths)."""
    try:
        return torch.load(source, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:
        raise WeightsError(f"cannot read {path} as a torch checkpoint of tensors: {_torch_reason(error)}") from error


def _torch_reason(error: Exception) -> str:
    """torch's reason for refusing a file, without its advice to load it with `weights_only=False` (runs code)."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        reason = message.split("WeightsUnpickler error:", 1)[1].strip().split(". ", 1)[0].split("\n", 1)[0]
        return f"it holds pickled objects other than tensors ({reason}); only tensors are read from torch files"
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    return " ".join(lines)[:500] or type(error).__name__


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
    `HF_HUB_OFFLINE`. Raises FileNotFoundError, naming the path or repository id, when nothing is found
    (NotInHubCacheError, saying how to get it, for a hub file not in the cache while the hub cannot be asked), and
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
    at = f" at revision {revision!r}" if revision else ""
    target = f"{what!r} of " if what else ""
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision))
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=f"{subfolder}/*" if subfolder else None)
    except LocalEntryNotFoundError as error:
        raise NotInHubCacheError(_cache_miss(repo_id, f"{target}{repo_id!r}{at}")) from error
    except (EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        message = " ".join(str(error).split())
        raise FileNotFoundError(
            f"cannot find {target}{repo_id!r}{at}: there is no such local file or folder, and the Hugging Face "
            f"Hub lookup failed: {message}"
        ) from error
    resolved = Path(folder, subfolder or "")
    if not resolved.is_dir():
        raise FileNotFoundError(f"no folder {subfolder!r} in hub repository {repo_id!r} ({folder})")
    return resolved


def _cache_miss(repo_id: str, what: str) -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    cached = Path(constants.HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}")
    return (
        f"{repo_id!r} is no local file or folder, so it was taken as a Hugging Face Hub repository id; {what} is not "
        f"in the hub cache ({cached}/snapshots/<commit>/) and {why}: download it once with network access and "
        f"HF_HUB_OFFLINE unset (`hf download {repo_id}`, or any from_pretrained call), or pass a local folder"
    )


def _tensors_of(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    entries = cast(dict[Any, Any], checkpoint)
    if isinstance(entries.get("state_dict"), dict):
        entries = cast(dict[Any, Any], entries["state_dict"])
    tensors: dict[str, torch.Tensor] = {}
    for name, value in entries.items():
        if isinstance(name, str) and isinstance(value, dict) and value:
            # One level of nesting, as IP-Adapter's {"image_proj": {...}, "ip_adapter": {...}}: keys joined by ".".
            for inner, tensor in cast(dict[Any, Any], value).items():
                if not isinstance(inner, str) or not isinstance(tensor, torch.Tensor):
                    raise WeightsError(
                        f"{path} is not a dict of tensors: entry {name!r}: {inner!r} is a {type(tensor).__name__}"
                    )
                tensors[f"{name}.{inner}"] = tensor
            continue
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            kind = type(cast(object, value)).__name__
            raise WeightsError(f"{path} is not a dict of tensors: entry {name!r} is a {kind}")
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
