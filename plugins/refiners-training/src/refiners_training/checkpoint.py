"""Checkpoints written atomically: a kill at any moment leaves the latest complete checkpoint loadable.

A checkpoint is a folder `checkpoints/step-NNNNNN/`. It is written in full into a temporary folder beside it, every
file is flushed to disk (fsync), and the folder is renamed into place; only then does the `checkpoints/latest`
pointer file, itself replaced atomically (`os.replace` of a fsynced temporary file), name it. A checkpoint that
was cut short is therefore never the one `latest` names, and its leftovers are removed by the next write.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

LATEST = "latest"
TEMPORARY_PREFIX = ".tmp-"
NAME_PATTERN = re.compile(r"step-(\d{6,})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at optimizer step `step`."""
    return f"step-{step:06d}"


def write_checkpoint(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Create checkpoint `root / name` with `write(folder)`, then point `root / latest` at it; returns its path.

    `write` fills an empty temporary folder. If it raises, the temporary folder is removed, `latest` is unchanged
    and the error propagates. A folder already named `name` (from a run that stopped before pointing `latest` at
    it) is replaced.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    temporary = root / f"{TEMPORARY_PREFIX}{name}-{os.getpid()}"
    temporary.mkdir()
    try:
        write(temporary)
        for path in sorted(temporary.rglob("*"), reverse=True):
            _fsync(path)
        _fsync(temporary)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync(root)
    point_latest(root, name)
    return final


def point_latest(root: Path, name: str) -> None:
    """Make `root / latest` name checkpoint `name`, atomically (an fsynced temporary file renamed over it)."""
    pointer = root / f"{TEMPORARY_PREFIX}{LATEST}-{os.getpid()}"
    with open(pointer, "w", encoding="utf-8") as file:
        file.write(name + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(pointer, root / LATEST)
    _fsync(root)


def latest_checkpoint(root: Path) -> Path | None:
    """The folder `root / latest` names, or None if there is no checkpoint yet.

    Raises CheckpointError if `latest` is not the name of a checkpoint folder of `root`.
    """
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        with open(pointer, "rb") as file:
            name = file.read(1024).decode("utf-8").strip()  # a checkpoint's name is short: no more is read
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"cannot read {pointer}: {error}") from error
    folder = root / name
    if not NAME_PATTERN.fullmatch(name) or not folder.is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {name[:100]!r}, which is not a checkpoint folder of {root}")
    return folder


def checkpoint_step(folder: Path) -> int:
    """The step of checkpoint folder `step-NNNNNN`; -1 for a folder that is not a checkpoint."""
    match = NAME_PATTERN.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def earlier_checkpoints(root: Path, than: int | None = None) -> list[Path]:
    """The checkpoint folders of `root` (`step-NNNNNN`) before step `than` (all of them if None), newest first."""
    folders = [path for path in root.iterdir() if path.is_dir() and checkpoint_step(path) >= 0] if root.is_dir() else []
    return sorted((path for path in folders if than is None or checkpoint_step(path) < than), key=checkpoint_step)[::-1]


def remove_leftovers(root: Path) -> None:
    """Remove the temporary folders and files of writes that were cut short."""
    for path in root.glob(f"{TEMPORARY_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's content to disk (folders: their entries; a no-op where the OS refuses)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # e.g. folders cannot be opened on Windows
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
