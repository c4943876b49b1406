"""The `--controlnet FOLDER:IMAGE[:SCALE]` option of `refiners generate`."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from refiners_controlnet.adapter import ControlNetAdapter
from refiners_controlnet.condition import image_to_condition
from refiners_controlnet.controlnet import ControlNet
from refiners_core.checks import check_finite, check_weights_file
from refiners_core.weights import resolve_path
from refiners_sd15 import MAX_IMAGE_SIDE
from refiners_sd15.unet import SD1UNet

OPTION_HELP = (
    "steer the generation with a ControlNet (a diffusers ControlNetModel folder or hub id) and its conditioning "
    "image (resized to the generated size), with an optional scale (default 1.0); repeat the option for several "
    "ControlNets, whose residuals add up"
)
OPTION_METAVAR = "FOLDER:IMAGE[:SCALE]"
WEIGHTS_STEM = "diffusion_pytorch_model"
"""The name of a diffusers ControlNet folder's weight files (before `.safetensors`, `.fp16.safetensors`...)."""
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ControlNetOption:
    """One parsed `--controlnet` value."""

    controlnet: str
    image: Path
    scale: float = 1.0


def parse_controlnet_option(value: str) -> ControlNetOption:
    """Parse `FOLDER:IMAGE[:SCALE]`: `FOLDER` a local folder or a hub id, the scale 1 when absent.

    Paths may not contain ':' except after a drive letter (`C:\\controlnets\\canny`). Raises ValueError naming
    the value if a part is missing or the scale is not a finite number.
    """
    parts: list[str] = []
    for part in value.split(":"):
        if parts and len(parts[-1]) == 1 and parts[-1].isalpha() and part[:1] in ("\\", "/"):
            parts[-1] += ":" + part  # a Windows drive letter
        else:
            parts.append(part)
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise ValueError(
            f"--controlnet {value!r}: expected {OPTION_METAVAR}, e.g. lllyasviel/sd-controlnet-canny:edges.png:0.8"
        )
    scale = 1.0
    if len(parts) == 3:
        try:
            scale = float(parts[2])
        except ValueError:
            raise ValueError(f"--controlnet {value!r}: the scale {parts[2]!r} is not a number") from None
        check_finite(f"--controlnet {value!r}: the scale", parts[2])
    return ControlNetOption(parts[0], Path(parts[1]), scale)


def validate_controlnet_option(values: list[str]) -> None:
    """Check the `--controlnet` values before the model is loaded: the syntax, a finite scale, the image (a readable
    image file of at most `MAX_IMAGE_SIDE` pixels a side, by its header) and the ControlNet: a file written by
    `ControlNet.save`, a diffusers folder with a `config.json` and `diffusion_pytorch_model` weights (each a
    safetensors file or torch checkpoint by its first bytes), or a hub id whose `config.json` is found (in the hub
    cache when offline). Raises ValueError or FileNotFoundError
    naming the value at fault."""
    for value in values:
        option = parse_controlnet_option(value)
        _check_image_header(value, option.image)
        what = f"--controlnet {value!r}"
        local = Path(option.controlnet).expanduser()
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
        elif not _HUB_ID.match(option.controlnet):
            raise FileNotFoundError(
                f"{what}: {option.controlnet} is neither a local file or folder nor a hub id (owner/name)"
            )
        else:
            try:  # the config alone: a hub id missing from the cache while offline is told before the model loads
                resolve_path(str(option.controlnet), "config.json")
            except FileNotFoundError as error:
                raise type(error)(f"{what}: {error}") from None


def _check_image_header(value: str, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"--controlnet {value!r}: no image at {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"--controlnet {value!r}: cannot read the image {path}: {error}") from None
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(
            f"--controlnet {value!r}: the image {path} is {width}x{height}: each side must be at most {MAX_IMAGE_SIDE}"
        )


def apply_controlnet_option(model: Any, values: list[str]) -> None:
    """Inject one `ControlNetAdapter` per `--controlnet` value into `model.unet` (a `StableDiffusion_1`'s).

    Every value is parsed and every ControlNet and image loaded before anything is injected, so a bad value leaves
    the model unchanged. Raises ValueError, FileNotFoundError or WeightsError naming the value at fault.
    """
    unet = getattr(model, "unet", None)
    if not isinstance(unet, SD1UNet):
        raise TypeError(f"--controlnet needs a Stable Diffusion 1.5 model with a SD1UNet, got {type(model).__name__}")
    adapters: list[ControlNetAdapter] = []
    for value in values:
        option = parse_controlnet_option(value)
        try:
            with Image.open(option.image) as image:
                condition = image_to_condition(image).to(device=unet.device, dtype=unet.dtype)
        except OSError as error:
            raise FileNotFoundError(f"--controlnet {value!r}: cannot read the image {option.image}: {error}") from error
        try:
            controlnet = ControlNet.from_pretrained(option.controlnet, device=unet.device, dtype=unet.dtype)
            adapter = ControlNetAdapter(unet, controlnet, scale=option.scale)
        except Exception as error:
            error.add_note(f"while loading --controlnet {value!r}")
            raise
        adapters.append(adapter.set_condition(condition))
    for adapter in adapters:
        adapter.inject()
