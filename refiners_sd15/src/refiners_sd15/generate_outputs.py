"""The images `refiners generate` writes, and what they record to be made again.

Each image is written atomically (`write_atomically`: a temporary file in the output's folder, then `os.replace`),
and a PNG records every setting it was made with in its text chunks: `prompt`, `negative`, `seed`, `size`, `steps`,
`guidance`, `solver`, `model`, the files of the plugins' options (LoRAs, adapters) and of the init image and mask
with their sha256, in one JSON chunk `refiners` (with the versions of the installed refiners packages and torch)
and, for people, one chunk per top-level setting. `is_complete` tells whether an output already holds an item's
image (how a rerun resumes); `read_settings` gives back what `refiners generate --from-image` makes again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from refiners_sd15.generate_checks import TEMPORARY_PREFIX, GenerateError

SETTINGS_CHUNK = "refiners"
"""The PNG text chunk holding the JSON of every setting (`settings`, and `versions`)."""
_PACKAGES = ("torch",)


def write_atomically(
    image: Image.Image,
    out: Path,
    image_format: str,
    *,
    settings: Mapping[str, Any] | None = None,
    prefix: str = TEMPORARY_PREFIX,
) -> None:
    """Write `image` to a temporary file beside `out` (named `prefix...tmp`), then rename it over `out`: all or
    nothing. A PNG records `settings` (and `versions()`) in its text chunks."""
    out.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    if settings is not None and image_format == "PNG":
        options["pnginfo"] = _png_text(settings)
    descriptor, temporary = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            image.save(file, format=image_format, **options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_temporaries(folder: Path, prefix: str) -> None:
    """Remove the temporary files `write_atomically(..., prefix=prefix)` left in `folder` by a killed process."""
    if folder.is_dir():
        for path in folder.glob(f"{prefix}*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()


def versions() -> dict[str, str]:
    """The versions of the installed refiners distributions and torch, by name."""
    found: dict[str, str] = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"] or ""
        if name.lower().startswith("refiners") or name in _PACKAGES:
            found[name.lower()] = distribution.version
    return dict(sorted(found.items()))


def file_record(value: str) -> dict[str, str]:
    """`{"value": value}`, with `"sha256"` of the file `value` names: `value` itself, or what comes before one of its
    last colons (`FILE:SCALE`, `FILE:SCALE:MORE`), when that is an existing file."""
    candidate = value
    while True:
        path = Path(candidate).expanduser()
        if path.is_file():
            stat = path.stat()
            return {"value": value, "sha256": _sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)}
        head, colon, _ = candidate.rpartition(":")
        if not colon or not head:
            return {"value": value}
        candidate = head


@functools.lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """The sha256 of the file at `path`, cached while its modification time and size stay the same."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(functools.partial(file.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _png_text(settings: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(SETTINGS_CHUNK, json.dumps({"settings": settings, "versions": versions()}, sort_keys=True))
    for key, value in settings.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return info


def recorded_settings(path: Path) -> dict[str, Any] | None:
    """The settings `path` records, or None if it is not a whole, readable PNG written by `write_atomically` with
    settings."""
    try:
        with Image.open(path) as image:
            image.load()
            text: Any = getattr(image, "text", {})
            recorded = json.loads(text[SETTINGS_CHUNK])["settings"]
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, Image.DecompressionBombError):
        return None
    return recorded if isinstance(recorded, dict) else None  # pyright: ignore[reportUnknownVariableType]


def is_complete(path: Path, settings: Mapping[str, Any]) -> bool:
    """Whether `path` is a whole PNG made with exactly `settings` (its files' hashes included)."""
    return recorded_settings(path) == json.loads(json.dumps(settings))


def read_settings(path: Path) -> dict[str, Any]:
    """The settings `refiners generate --from-image` makes `path` again with. Raises GenerateError naming `path` if it
    cannot be read or records no settings, or if a file it names has changed since (its sha256 differs)."""
    if not path.is_file():
        raise GenerateError(f"--from-image {path}: no such file")
    settings = recorded_settings(path)
    if settings is None:
        raise GenerateError(
            f"--from-image {path}: not a PNG written by refiners generate (no '{SETTINGS_CHUNK}' chunk)"
        )
    for record in _file_records(settings):
        now = file_record(record["value"])
        if now.get("sha256") != record.get("sha256"):
            raise GenerateError(
                f"--from-image {path}: {record['value']} is not the file the image was made with "
                f"(sha256 {record.get('sha256')}, now {now.get('sha256', 'missing')})"
            )
    return settings


def _file_records(settings: Mapping[str, Any]) -> list[dict[str, str]]:
    records: list[dict[str, str]] = [settings[key] for key in ("init_image", "mask") if key in settings]
    for values in settings.get("options", {}).values():
        records.extend(values)
    return records
