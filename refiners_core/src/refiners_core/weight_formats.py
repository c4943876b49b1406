"""The bytes of weight files: what kind a file is, a safetensors reader that copies and one that maps, a torch
archive inspector.

`load_tensors` (in `refiners_core.weights`) uses these; they raise `WeightsError` naming the file for anything
malformed, and never run code from a file:

- `sniff` tells a file's kind from its first bytes, whatever its name: a safetensors file named `.pth` is read as
  safetensors, a git-lfs pointer is reported as one.
- `read_safetensors` checks the header as strictly as the safetensors library does, then reads the data into one
  buffer of the process's own memory (in pieces, on two threads): nothing stays memory-mapped, so a file changed,
  truncated or deleted after loading cannot change the tensors or crash the process, and the weights are in memory
  once. This is the default.
- `map_safetensors` checks the header the same way, then maps the file (one private mapping) and gives tensors that
  are views of it: no copy, but the file must stay as it is while the tensors live (truncating it kills the process
  with SIGBUS on the next read, overwriting it in place changes them). `load_tensors(..., mmap=True)` uses it.
- `inspect_torch_archive` reads the pickle of a torch zip archive without building anything from it, to learn the
  storages it declares, and refuses entries that would inflate to more than those declare (archive bombs).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import torch

Kind = Literal["safetensors", "torch-zip", "torch-legacy", "git-lfs", "empty", "unknown"]

MAX_SAFETENSORS_HEADER = 100_000_000
"""The largest safetensors header read, in bytes (the safetensors library's own limit)."""
MAX_PICKLE_BYTES = 256 * 2**20
"""The most that a torch archive's pickle, or any entry other than a declared storage, may inflate to."""
MAX_INFLATION = 32
"""How many times its compressed size a compressed archive entry of more than 1 MiB may inflate to (torch itself
never compresses; float weights deflate by about 10%)."""
_ALIGNMENT = 64
_PIECE_BYTES = 16 * 2**20
_MAX_TARGETS = 512  # iovecs per preadv call, under every system's IOV_MAX (1024 on Linux)
READER_THREADS = 2
"""Threads that read weights: copying a file into memory (`read_safetensors`) and checking that they are finite
(`weights.check_weights`). Memory-bound work that releases the GIL: two already take what one core cannot."""


class WeightsError(ValueError):
    """A file could not be read or written as weights, or its weights are not what a model needs; the message
    names the file (and the key, where one is at fault). Public as `refiners_core.weights.WeightsError`."""


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
}


def sniff(file: BinaryIO, size: int) -> Kind:
    """The kind of an open weights file, from its first bytes (the file is left at its start)."""
    file.seek(0)
    head = file.read(64)
    file.seek(0)
    if not head:
        return "empty"
    if head.startswith(b"version https://git-lfs"):
        return "git-lfs"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch-zip"
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER:
        return "safetensors"  # if the file is shorter than its header claims, the reader says it is truncated
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(file: BinaryIO, size: int, path: Path) -> tuple[list[_Entry], dict[str, str], int]:
    """The tensors (sorted by offset), the metadata and the data offset of a safetensors file, all checked."""
    file.seek(0)
    prefix = file.read(8)
    if len(prefix) < 8:
        raise WeightsError(f"cannot read {path} as safetensors: {size} bytes, shorter than a header")
    length = int.from_bytes(prefix, "little")
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        raise WeightsError(
            f"cannot read {path} as safetensors: its header claims {length} bytes, but the file has {size} "
            f"(the limit is {MAX_SAFETENSORS_HEADER}): truncated or not safetensors"
        )
    try:
        header: object = json.loads(file.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise WeightsError(f"cannot read {path} as safetensors: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise WeightsError(f"cannot read {path} as safetensors: its header is not a JSON object")
    fields = cast(dict[str, Any], header)
    raw_metadata: object = fields.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict) or not all(
        isinstance(value, str) for value in cast(dict[str, Any], raw_metadata).values()
    ):
        raise WeightsError(f"cannot read {path} as safetensors: '__metadata__' must map strings to strings")
    entries = sorted((_entry(name, info, path) for name, info in fields.items()), key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise WeightsError(
                f"cannot read {path} as safetensors: tensor '{entry.name}' starts at byte {entry.begin} of the data, "
                f"expected {position} (tensors overlap or leave a gap)"
            )
        position = entry.end
    if 8 + length + position != size:
        raise WeightsError(
            f"cannot read {path} as safetensors: its header describes {position} bytes of data, the file holds "
            f"{size - 8 - length}: truncated or damaged"
        )
    return entries, cast(dict[str, str], raw_metadata), 8 + length


def _entry(name: str, info: object, path: Path) -> _Entry:
    where = f"cannot read {path} as safetensors: tensor '{name}'"
    if not isinstance(info, dict):
        raise WeightsError(f"{where} is described by {info!r}, not an object")
    described = cast(dict[str, Any], info)
    dtype = SAFETENSORS_DTYPES.get(described.get("dtype"))  # pyright: ignore[reportArgumentType]
    if dtype is None:
        raise WeightsError(f"{where} has the unknown dtype {described.get('dtype')!r}")
    shape, offsets = described.get("shape"), described.get("data_offsets")
    if not isinstance(shape, list) or not all(_natural(d) for d in cast(list[Any], shape)):
        raise WeightsError(f"{where} has the shape {shape!r}, not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(cast(list[Any], offsets)) != 2
        or not all(_natural(o) for o in cast(list[Any], offsets))
    ):
        raise WeightsError(f"{where} has the data offsets {offsets!r}, not two non-negative integers")
    dims, (begin, end) = tuple(cast(list[int], shape)), cast(list[int], offsets)
    expected = math.prod(dims) * dtype.itemsize
    if end - begin != expected:
        raise WeightsError(
            f"{where} has shape {dims} of {described['dtype']} ({expected} bytes) but data offsets {[begin, end]}"
        )
    return _Entry(name, dtype, dims, begin, end)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(file: BinaryIO, size: int, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, copied into this process's memory (see the module doc).

    All tensors are views of one buffer, each aligned to 64 bytes, filled from the file in pieces of about
    `_PIECE_BYTES` by `READER_THREADS` threads (the copy from the page cache, and the page faults of the fresh buffer,
    are most of the cost of a load; reads release the GIL): the weights are held once, and no mapping of the file
    remains. When the copy does not fit in the free memory (`_release_cache`), each piece's pages are dropped from the
    page cache once copied.
    """
    entries, metadata, data_start = read_safetensors_header(file, size, path)
    slots: list[int] = []
    total = 0
    for entry in entries:
        slots.append(total)
        total += -(-(entry.end - entry.begin) // _ALIGNMENT) * _ALIGNMENT
    buffer = torch.empty(total, dtype=torch.uint8)
    view = memoryview(cast(Any, buffer.numpy())) if total else memoryview(bytearray())
    release = _release_cache(file, size)

    def read(piece: _Piece) -> None:
        _read_piece(file, piece, path)
        release(piece.offset, piece.length)

    pieces = _pieces(entries, slots, data_start, view)
    if len(pieces) > 1 and hasattr(os, "preadv"):
        with ThreadPoolExecutor(READER_THREADS) as pool:
            for _ in pool.map(read, pieces):
                pass
    else:
        for piece in pieces:
            read(piece)
    tensors = {
        entry.name: buffer[slot : slot + entry.end - entry.begin].view(entry.dtype).view(entry.shape)
        for entry, slot in zip(entries, slots, strict=True)
    }
    return {entry.name: tensors[entry.name] for entry in sorted(entries, key=lambda e: e.name)}, metadata


def map_safetensors(file: BinaryIO, size: int, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, as views of one private mapping of the file (see the module
    doc): nothing is read but the header, the pages of a tensor are read from the page cache when it is first used.

    The header is checked as `read_safetensors` checks it (the same errors, before anything is mapped), then the file
    at `path` is mapped whole (`torch.UntypedStorage.from_file`, `shared=False`: writing a tensor copies its page and
    never reaches the file) and its header, read through the mapping, must be the one checked. A tensor whose offset
    in the file is not a multiple of its element size cannot be a view of the mapping: it is copied out of it.
    Raises WeightsError naming the file when it cannot be mapped or changed between the check and the mapping.
    """
    entries, metadata, data_start = read_safetensors_header(file, size, path)
    file.seek(0)
    header = file.read(data_start)
    try:
        from_file = cast(Callable[..., torch.UntypedStorage], torch.UntypedStorage.from_file)  # pyright: ignore[reportUnknownMemberType]
        storage = from_file(str(path), shared=False, nbytes=size)
    except RuntimeError as error:
        raise WeightsError(f"cannot map {path}: {error}") from error
    mapped = torch.empty(0, dtype=torch.uint8).set_(storage)
    if mapped.numel() != size or bytes(cast(Any, mapped[:data_start].numpy())) != header:
        raise WeightsError(f"cannot map {path}: the file changed while it was being opened")
    tensors: dict[str, torch.Tensor] = {}
    for entry in sorted(entries, key=lambda e: e.name):
        begin = data_start + entry.begin
        data = mapped[begin : data_start + entry.end]
        if begin % entry.dtype.itemsize:
            data = data.clone()  # a view must start at a whole element of its dtype
        tensors[entry.name] = data.view(entry.dtype).view(entry.shape)
    return tensors, metadata


def torch_archive_is_stored(file: BinaryIO) -> bool:
    """Whether every entry of a torch zip archive is stored uncompressed, as `torch.save` writes them: only then
    can `torch.load(mmap=True)` map its tensors (it maps a deflated entry's compressed bytes as if they were the
    tensor's). The file is left at its start; it must be a zip archive (`inspect_torch_archive` checked it)."""
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        stored = all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    file.seek(0)
    return stored


@dataclass(frozen=True)
class _Piece:
    """`length` contiguous bytes of the file from `offset`, read into `targets` (consecutive tensors' slots)."""

    offset: int
    length: int
    targets: list[memoryview]
    first_tensor: str


def _pieces(entries: list[_Entry], slots: list[int], data_start: int, view: memoryview) -> list[_Piece]:
    """The file's data cut into pieces of about `_PIECE_BYTES`: small tensors grouped, big ones split."""
    pieces: list[_Piece] = []
    targets: list[memoryview] = []
    offset = length = 0
    name = ""
    for entry, slot in zip(entries, slots, strict=True):
        size = entry.end - entry.begin
        for start in range(0, size, _PIECE_BYTES):
            if not targets:
                offset, name = data_start + entry.begin + start, entry.name
            part = min(_PIECE_BYTES, size - start)
            targets.append(view[slot + start : slot + start + part])
            length += part
            if length >= _PIECE_BYTES or len(targets) == _MAX_TARGETS:
                pieces.append(_Piece(offset, length, targets, name))
                targets, length = [], 0
    if targets:
        pieces.append(_Piece(offset, length, targets, name))
    return pieces


def _read_piece(file: BinaryIO, piece: _Piece, path: Path) -> None:
    position, targets = piece.offset, piece.targets
    while targets:
        if hasattr(os, "preadv"):
            read = os.preadv(file.fileno(), targets, position)
        else:  # one thread only (see read_safetensors)
            file.seek(position)
            read = cast(io.BufferedReader, file).readinto(targets[0])
        if not read:
            raise WeightsError(
                f"cannot read {path} as safetensors: the file ended inside the tensors from '{piece.first_tensor}' on"
            )
        position += read
        while targets and read >= len(targets[0]):
            read -= len(targets[0])
            targets = targets[1:]
        if targets and read:
            targets = [targets[0][read:], *targets[1:]]


def _release_cache(file: BinaryIO, size: int) -> Callable[[int, int], None]:
    """A function `release(offset, length)` that drops these bytes of the file from the page cache once they are
    copied, if copying the file (`size` bytes) needs more than the free memory; otherwise, or off Linux, it does
    nothing.

    Copying a file bigger than the free memory makes the kernel evict cached pages, and it evicts first the pages
    read once, not those read twice: the part of the file still to copy, which must then be read again from the disk
    (measured: 3 to 7 GB of the 14 GB SDXL folder on a 24 GB machine). Dropping what is already copied leaves the
    memory the copy needs free instead. A file that fits in the free memory stays cached for the next load.
    """
    if not hasattr(os, "posix_fadvise") or size <= _free_memory():
        return lambda offset, length: None
    descriptor = file.fileno()
    return lambda offset, length: os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_DONTNEED)


def _free_memory() -> int:
    """The free memory in bytes (`MemFree` of /proc/meminfo; page cache not counted), or 2**63 if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemFree:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**63


_STORAGE_ITEMSIZES = {
    "UntypedStorage": 1,  # bytes: what torch writes for dtypes without a storage class of their own (float8...)
    **{name: 8 for name in ("DoubleStorage", "LongStorage", "ComplexFloatStorage")},
    **{name: 4 for name in ("FloatStorage", "IntStorage", "QInt32Storage")},
    **{name: 2 for name in ("HalfStorage", "BFloat16Storage", "ShortStorage")},
    **{name: 1 for name in ("CharStorage", "ByteStorage", "BoolStorage", "QInt8Storage", "QUInt8Storage")},
    **{name: 1 for name in ("QUInt4x2Storage", "QUInt2x4Storage")},
    "ComplexDoubleStorage": 16,
}
"""The storage classes a torch pickle names, with the size of their elements in bytes."""


class _Stand(collections.OrderedDict[Any, Any]):
    """Whatever a pickle asks for: calling, building or filling it does nothing (no code from the file runs)."""

    module: str = ""
    qualname: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stand:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Inspector(pickle.Unpickler):
    """Unpickles a torch archive's `data.pkl` with stand-ins for every global, recording the declared storages."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path
        self.storages: dict[str, int] = {}  # storage key -> declared size in bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return type(name, (_Stand,), {"module": module, "qualname": name})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(cast(tuple[Any, ...], pid)) == 5 and pid[0] == "storage"):
            raise WeightsError(f"{self.path}: its pickle refers to {pid!r}, not to a storage of the archive")
        _, storage_type, key, _, numel = cast(tuple[Any, ...], pid)
        itemsize = _STORAGE_ITEMSIZES.get(getattr(storage_type, "qualname", ""))
        if itemsize is None or not isinstance(key, str) or not _natural(numel):
            raise WeightsError(f"{self.path}: its pickle declares a storage {pid!r} of no known type and size")
        self.storages[key] = max(self.storages.get(key, 0), numel * itemsize)
        return _Stand()


def inspect_torch_archive(file: BinaryIO, path: Path) -> tuple[list[str], dict[str, int]]:
    """The top-level keys (inside a "state_dict" entry if there is one) and the declared storages of a torch zip.

    Raises WeightsError naming the file and entry when an entry would inflate to more than the pickle declares
    for it, a compressed entry inflates more than `MAX_INFLATION` times, or the pickle is over `MAX_PICKLE_BYTES`.
    """
    try:
        archive = zipfile.ZipFile(file)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
        raise WeightsError(f"cannot read {path} as a torch checkpoint: not a valid zip archive ({error})") from error
    pickles = [info for info in infos if info.filename == "data.pkl" or info.filename.endswith("/data.pkl")]
    if not pickles:
        raise WeightsError(f"cannot read {path} as a torch checkpoint: the zip archive holds no data.pkl")
    record = pickles[0]
    prefix = record.filename.removesuffix("data.pkl")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(2**20, MAX_INFLATION * info.compress_size):
            raise WeightsError(
                f"{path}: archive entry '{info.filename}' inflates to {info.file_size} bytes from "
                f"{info.compress_size} (more than {MAX_INFLATION} times): refused as an archive bomb"
            )
    if record.file_size > MAX_PICKLE_BYTES:
        raise WeightsError(
            f"{path}: archive entry '{record.filename}' inflates to {record.file_size} bytes, more than a "
            f"checkpoint's pickle may ({MAX_PICKLE_BYTES})"
        )
    try:
        with archive.open(record) as handle:
            inspector = _Inspector(handle.read(MAX_PICKLE_BYTES + 1), path)
        content: object = inspector.load()
    except WeightsError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise WeightsError(f"cannot read {path} as a torch checkpoint: {error}") from error
    except Exception as error:  # any malformed pickle: the stand-ins run nothing, so only parsing fails
        raise WeightsError(f"cannot read {path} as a torch checkpoint: its pickle is malformed ({error})") from error
    for info in infos:
        name = info.filename.removeprefix(prefix)
        declared = inspector.storages.get(name.removeprefix("data/")) if name.startswith("data/") else None
        if declared is not None and info.file_size != declared:
            raise WeightsError(
                f"{path}: archive entry '{info.filename}' inflates to {info.file_size} bytes, but the pickle declares "
                f"a storage of {declared} bytes for it: refused"
            )
        if declared is None and info is not record and info.file_size > MAX_PICKLE_BYTES:
            raise WeightsError(
                f"{path}: archive entry '{info.filename}' inflates to {info.file_size} bytes and is no declared "
                "storage: refused"
            )
    return _keys(content), inspector.storages


def _keys(content: object) -> list[str]:
    if isinstance(content, dict):
        entries = cast(dict[Any, Any], content)
        nested = entries.get("state_dict")
        if isinstance(nested, dict) and not isinstance(nested, _Stand):
            entries = cast(dict[Any, Any], nested)
        return [key for key in entries if isinstance(key, str)]
    return []
