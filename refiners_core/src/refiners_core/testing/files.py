"""Change a weights file behind a loaded model's back, as another program might, for the tests that prove a loaded
model does not depend on its file any more (no memory map left alive)."""

from __future__ import annotations

import os
from pathlib import Path

FILE_CHANGES = ("truncate", "overwrite in place", "replace like cp", "delete")
"""What `change_file` can do to a file."""


def change_file(path: Path, change: str) -> None:
    """Change `path`: "truncate" it to 0 bytes, "overwrite in place" with random bytes (same size, same inode),
    "replace like cp" (a third of its size in random bytes, written through the same inode as `cp` does), or
    "delete" it; "none" leaves it as it is. Raises ValueError for another change."""
    size = path.stat().st_size
    if change == "truncate":
        os.truncate(path, 0)
    elif change == "overwrite in place":
        with open(path, "r+b") as file:
            file.write(os.urandom(size))
    elif change == "replace like cp":
        with open(path, "wb") as file:
            file.write(os.urandom(size // 3))
    elif change == "delete":
        path.unlink()
    elif change != "none":
        raise ValueError(f"unknown file change {change!r}: expected 'none' or one of {', '.join(FILE_CHANGES)}")
