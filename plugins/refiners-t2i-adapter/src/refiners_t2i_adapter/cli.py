"""The `--t2i-adapter FOLDER:IMAGE[:SCALE]` option of `refiners generate`."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from refiners_core.checks import check_finite, check_weights_file
from refiners_core.weights import resolve_path
from refiners_sd15 import MAX_IMAGE_SIDE
from refiners_t2i_adapter.adapter import T2IAdapter

FLAG = "--t2i-adapter"
OPTION_HELP = (
    "steer the generation with a T2I-Adapter (a diffusers T2IAdapter folder or hub id) and its condition image "
    "(resized to the generated size), with an optional scale (default 1.0); repeat the option for several "
    "adapters, whose features add up"
)
OPTION_METAVAR = "FOLDER:IMAGE[:SCALE]"
WEIGHTS_STEM = "diffusion_pytorch_model"
"""The name of a diffusers T2I-Adapter folder's weight files (before `.safetensors` or `.bin`)."""
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class T2IAdapterOption:
    """One parsed `--t2i-adapter` value."""

    adapter: str
    image: Path
    scale: float = 1.0


def parse_t2i_adapter_option(value: str) -> T2IAdapterOption:
    """Parse `FOLDER:IMAGE[:SCALE]`: `FOLDER` a local folder, a file written by `T2IAdapterModel.save` or a hub id;
    the scale 1 when absent. Paths may not contain ':' except after a drive letter (`C:\\adapters\\canny`). Raises
    ValueError naming the value if a part is missing or the scale is not a finite number."""
    parts: list[str] = []
    for part in value.split(":"):
        if parts and len(parts[-1]) == 1 and parts[-1].isalpha() and part[:1] in ("\\", "/"):
            parts[-1] += ":" + part  # a Windows drive letter
        else:
            parts.append(part)
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(
            f"{FLAG} {value!r}: expected {OPTION_METAVAR}, e.g. TencentARC/t2iadapter_canny_sd15v2:edges.png:0.8"
        )
    scale = 1.0
    if len(parts) == 3:
        try:
            scale = float(parts[2])
        except ValueError:
            raise ValueError(f"{FLAG} {value!r}: the scale {parts[2]!r} is not a number") from None
        check_finite(f"{FLAG} {value!r}: the scale", parts[2])
    return T2IAdapterOption(parts[0], Path(parts[1]), scale)


def validate_t2i_adapter_option(values: list[str]) -> None:
    """Check the `--t2i-adapter` values before the model is loaded: the syntax, a finite scale, the image (a readable
    image file of at most `MAX_IMAGE_SIDE` pixels a side, by its header) and the adapter: a file written by
    `T2IAdapterModel.save`, a diffusers folder with a `config.json` and `diffusion_pytorch_model` weights (each a
    safetensors file or torch checkpoint by its first bytes), or a hub id whose `config.json` is found (in the hub
    cache when offline). Raises ValueError or FileNotFoundError naming the value at fault."""
    for value in values:
        option = parse_t2i_adapter_option(value)
        what = f"{FLAG} {value!r}"
        _check_image_header(what, option.image)
        local = Path(option.adapter).expanduser()
        if local.is_file():
            check_weights_file(what, local)
        elif local.is_dir():
            if not (local / "config.json").is_file():
                raise FileNotFoundError(f"{what}: {local} has no config.json (not a diffusers folder)")
            weights = sorted(path for path in local.glob(f"{WEIGHTS_STEM}*") if path.suffix in (".safetensors", ".bin"))
            if not weights:
                raise FileNotFoundError(f"{what}: {local} has no {WEIGHTS_STEM}.safetensors (or .bin) weights")
            for path in weights:
                check_weights_file(what, path)
        elif not _HUB_ID.match(option.adapter):
            raise FileNotFoundError(
                f"{what}: {option.adapter} is neither a local file or folder nor a hub id (owner/name)"
            )
        else:
            try:  # the config alone: a hub id missing from the cache while offline is told before the model loads
                resolve_path(option.adapter, "config.json")
            except FileNotFoundError as error:
                raise type(error)(f"{what}: {error}") from None


def _check_image_header(what: str, path: Path) -> None:
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


def apply_t2i_adapter_option(model: Any, values: list[str]) -> None:
    """Inject one `T2IAdapter` per `--t2i-adapter` value into `model.unet` (a `StableDiffusion_1`'s or
    `StableDiffusion_XL`'s). Every value is parsed, and every adapter and image loaded and checked against the UNet,
    before anything is injected, so a bad value leaves the model unchanged. Raises ValueError, TypeError,
    FileNotFoundError or WeightsError naming the value at fault."""
    unet = getattr(model, "unet", None)
    if unet is None:
        raise TypeError(f"{FLAG} needs a Stable Diffusion model with a UNet, got {type(model).__name__}")
    adapters: list[T2IAdapter] = []
    for value in values:
        option = parse_t2i_adapter_option(value)
        try:
            with Image.open(option.image) as opened:
                image = opened.copy()
        except OSError as error:
            raise FileNotFoundError(f"{FLAG} {value!r}: cannot read the image {option.image}: {error}") from error
        try:
            adapter = T2IAdapter.from_pretrained(unet, option.adapter, scale=option.scale)
            adapters.append(adapter.set_condition(image))
        except Exception as error:
            error.add_note(f"while loading {FLAG} {value!r}")
            raise
    for adapter in adapters:
        adapter.inject()
