"""The `--controlnet FOLDER:IMAGE[:SCALE]` option of `refiners generate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from refiners_controlnet.adapter import ControlNetAdapter
from refiners_controlnet.condition import image_to_condition
from refiners_controlnet.controlnet import ControlNet, unet_config
from refiners_controlnet.plugin import OPTION_METAVAR
from refiners_sd15.adapter_options import check_diffusers_adapter_value, split_adapter_value


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
    controlnet, image, scale = split_adapter_value(
        "--controlnet", value, OPTION_METAVAR, "lllyasviel/sd-controlnet-canny:edges.png:0.8"
    )
    return ControlNetOption(controlnet, Path(image), scale)


def validate_controlnet_option(values: list[str]) -> None:
    """Check the `--controlnet` values before the model is loaded: the syntax, a finite scale, the image (a readable
    image file of at most `MAX_IMAGE_SIDE` pixels a side, by its header) and the ControlNet: a file written by
    `ControlNet.save`, a diffusers folder with a `config.json` and `diffusion_pytorch_model` weights (each a
    safetensors file or torch checkpoint by its first bytes), or a hub id whose `config.json` is found (in the hub
    cache when offline). Raises ValueError or FileNotFoundError
    naming the value at fault."""
    for value in values:
        option = parse_controlnet_option(value)
        check_diffusers_adapter_value("--controlnet", value, option.controlnet, option.image)


def apply_controlnet_option(model: Any, values: list[str]) -> None:
    """Inject one `ControlNetAdapter` per `--controlnet` value into `model.unet` (a `StableDiffusion_1`'s or a
    `StableDiffusion_XL`'s).

    Every value is parsed and every ControlNet and image loaded before anything is injected, so a bad value leaves
    the model unchanged. Raises ValueError (an SD1.5 ControlNet on SDXL, or the reverse, included),
    FileNotFoundError or WeightsError naming the value at fault.
    """
    unet: Any = getattr(model, "unet", None)
    try:
        unet_config(unet)
    except TypeError as error:
        raise TypeError(f"--controlnet needs a Stable Diffusion model with a UNet: {error}") from None
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
