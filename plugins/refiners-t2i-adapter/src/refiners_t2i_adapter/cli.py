"""The `--t2i-adapter FOLDER:IMAGE[:SCALE]` option of `refiners generate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from refiners_sd15.adapter_options import check_diffusers_adapter_value, split_adapter_value
from refiners_t2i_adapter.adapter import T2IAdapter
from refiners_t2i_adapter.plugin import FLAG, OPTION_METAVAR


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
    adapter, image, scale = split_adapter_value(
        FLAG, value, OPTION_METAVAR, "TencentARC/t2iadapter_canny_sd15v2:edges.png:0.8"
    )
    return T2IAdapterOption(adapter, Path(image), scale)


def validate_t2i_adapter_option(values: list[str]) -> None:
    """Check the `--t2i-adapter` values before the model is loaded: the syntax, a finite scale, the image (a readable
    image file of at most `MAX_IMAGE_SIDE` pixels a side, by its header) and the adapter: a file written by
    `T2IAdapterModel.save`, a diffusers folder with a `config.json` and `diffusion_pytorch_model` weights (each a
    safetensors file or torch checkpoint by its first bytes), or a hub id whose `config.json` is found (in the hub
    cache when offline). Raises ValueError or FileNotFoundError naming the value at fault."""
    for value in values:
        option = parse_t2i_adapter_option(value)
        check_diffusers_adapter_value(FLAG, value, option.adapter, option.image)


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
