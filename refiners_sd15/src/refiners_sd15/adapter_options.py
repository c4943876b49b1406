"""Parsing and checking the `SOURCE:IMAGE[:SCALE]` values of the adapter options of `refiners generate`.

The adapter plugins (`--controlnet`, `--t2i-adapter`, `--ip-adapter`) share these so that their values are read and
checked the same way, each error naming the option and the value at fault.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image

from refiners_core.checks import check_finite, check_weights_file
from refiners_core.weights import resolve_path
from refiners_sd15.latent_diffusion import MAX_IMAGE_SIDE

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
"""A hub repository id, `owner/name`."""
DIFFUSERS_WEIGHTS_STEM = "diffusion_pytorch_model"
"""The name of a diffusers model folder's weight files (before `.safetensors`, `.fp16.safetensors`, `.bin`...)."""


def split_adapter_value(flag: str, value: str, metavar: str, example: str) -> tuple[str, str, float]:
    """Split `SOURCE:IMAGE[:SCALE]` into its source, image and scale (1 when absent).

    Paths may not contain ':' except after a drive letter (`C:\\models\\canny`). Raises ValueError naming `flag` and
    the value if a part is missing (the message shows `metavar` and `example`) or the scale is not a finite number.
    """
    parts: list[str] = []
    for part in value.split(":"):
        if parts and len(parts[-1]) == 1 and parts[-1].isalpha() and part[:1] in ("\\", "/"):
            parts[-1] += ":" + part  # a Windows drive letter
        else:
            parts.append(part)
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(f"{flag} {value!r}: expected {metavar}, e.g. {example}")
    scale = check_finite(f"{flag} {value!r}: the scale", parts[2]) if len(parts) == 3 else 1.0
    return parts[0], parts[1], scale


def check_image_header(what: str, path: Path) -> None:
    """Check, by its header only, that `path` is a readable image of at most `MAX_IMAGE_SIDE` pixels a side.

    Raises FileNotFoundError (no file) or ValueError (unreadable, too large), each naming `what` and the path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no image at {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{what}: cannot read the image {path}: {error}") from None
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(f"{what}: the image {path} is {width}x{height}: each side must be at most {MAX_IMAGE_SIDE}")


def check_diffusers_source(what: str, source: str, weights_stem: str) -> None:
    """Check a model given as a weights file, a diffusers folder or a hub id, without loading it.

    A file must be a safetensors file or torch checkpoint (by its first bytes); a folder must hold a `config.json`
    and `weights_stem*.safetensors` (or `.bin`) weights, each checked as a file; a hub id must have its `config.json`
    found (in the hub cache when offline). Raises FileNotFoundError or ValueError naming `what`.
    """
    local = Path(source).expanduser()
    if local.is_file():
        check_weights_file(what, local)
    elif local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{what}: {local} has no config.json (not a diffusers folder)")
        weights = sorted(path for path in local.glob(f"{weights_stem}*") if path.suffix in (".safetensors", ".bin"))
        if not weights:
            raise FileNotFoundError(f"{what}: {local} has no {weights_stem}.safetensors (or .bin) weights")
        for path in weights:
            check_weights_file(what, path)
    elif not HUB_ID.match(source):
        raise FileNotFoundError(f"{what}: {source} is neither a local file or folder nor a hub id (owner/name)")
    else:
        try:  # the config alone: a hub id missing from the cache while offline is told before the model loads
            resolve_path(source, "config.json")
        except FileNotFoundError as error:
            raise type(error)(f"{what}: {error}") from None


def check_diffusers_adapter_value(flag: str, value: str, source: str, image: Path) -> None:
    """Check the parts of the `flag` value `value` of an adapter stored as a diffusers model, without loading it: the
    image by its header (`check_image_header`), then the model `source` (`check_diffusers_source`, weights named
    `DIFFUSERS_WEIGHTS_STEM`). Raises FileNotFoundError or ValueError naming `flag` and `value`."""
    what = f"{flag} {value!r}"
    check_image_header(what, image)
    check_diffusers_source(what, source, DIFFUSERS_WEIGHTS_STEM)
