"""The `--ip-adapter WEIGHTS:IMAGE[:SCALE]` and `--ip-adapter-encoder FOLDER` options of `refiners generate`.

`--ip-adapter-encoder` is applied first (it is registered first): it only records the folder on the model, as
`model.ip_adapter_image_encoder`, where `--ip-adapter` reads it. Without it, each IP-Adapter's image encoder is the
`image_encoder/` folder beside its weights or beside their folder (as h94/IP-Adapter lays them out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refiners_clip_vision import CLIPImageEncoder, clip_image_config_from_transformers
from refiners_core.checks import check_weights_file
from refiners_core.model_kinds import weight_keys
from refiners_ip_adapter.adapter import IPAdapter
from refiners_ip_adapter.loading import image_encoder_beside
from refiners_ip_adapter.plugin import OPTION_METAVAR
from refiners_ip_adapter.unets import unet_family
from refiners_sd15.adapter_options import split_adapter_value
from refiners_sd15.generate_checks import open_image

ENCODER_ATTRIBUTE = "ip_adapter_image_encoder"
"""The model attribute where `--ip-adapter-encoder` leaves its folder for `--ip-adapter`."""


@dataclass(frozen=True)
class IPAdapterOption:
    """One parsed `--ip-adapter` value."""

    weights: Path
    image: Path
    scale: float = 1.0


def parse_ip_adapter_option(value: str) -> IPAdapterOption:
    """Parse `WEIGHTS:IMAGE[:SCALE]`, the scale 1 when absent. Paths may not contain ':' except after a drive letter
    (`C:\\\\models\\\\ip-adapter.bin`). Raises ValueError naming the value if a part is missing or the scale is not a
    finite number."""
    weights, image, scale = split_adapter_value(
        "--ip-adapter", value, OPTION_METAVAR, "ip-adapter_sd15.safetensors:reference.png:0.6"
    )
    return IPAdapterOption(Path(weights).expanduser(), Path(image).expanduser(), scale)


def validate_ip_adapter_option(values: list[str]) -> None:
    """Check the `--ip-adapter` values before the model loads: the syntax, a finite scale, the weights (a
    safetensors file or torch checkpoint by its first bytes; a safetensors file must hold `image_proj.*` and
    `ip_adapter.*` keys, by its header) and the image (readable, each side at most `MAX_IMAGE_SIDE`). Raises an
    exception naming the value at fault."""
    for value in values:
        option = parse_ip_adapter_option(value)
        what = f"--ip-adapter {value!r}"
        check_weights_file(what, option.weights)
        keys = weight_keys(option.weights)
        if keys is not None and not (
            any(key.startswith("image_proj.") for key in keys) and any(key.startswith("ip_adapter.") for key in keys)
        ):
            raise ValueError(
                f"{what}: {option.weights} holds no 'image_proj.*' and 'ip_adapter.*' keys: not IP-Adapter weights"
            )
        open_image(option.image, f"{what}: the image").close()


def validate_encoder_option(values: list[str]) -> None:
    """Check `--ip-adapter-encoder`: given once, a folder with a transformers CLIP vision `config.json`. Raises an
    exception naming the value at fault."""
    if len(values) > 1:
        raise ValueError(f"--ip-adapter-encoder is given {len(values)} times: give it once")
    folder = Path(values[0]).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--ip-adapter-encoder {values[0]}: no config.json in {folder}")
    try:
        clip_image_config_from_transformers(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise ValueError(f"--ip-adapter-encoder {values[0]}: {config}: {error}") from None


def apply_encoder_option(model: Any, values: list[str]) -> None:
    """Record the `--ip-adapter-encoder` folder on the model for `--ip-adapter` (nothing is loaded here)."""
    setattr(model, ENCODER_ATTRIBUTE, Path(values[0]).expanduser())


def apply_ip_adapter_option(model: Any, values: list[str]) -> None:
    """Build one `IPAdapter` per `--ip-adapter` value for `model.unet` (SD1.5's or SDXL's), with its reference image
    embedded, then inject them all: a bad value leaves the model unchanged. Image encoders found at the same folder
    are loaded once. Raises an exception naming the value at fault."""
    unet = getattr(model, "unet", None)
    unet_family(unet)  # TypeError naming the type
    assert unet is not None
    given: Path | None = getattr(model, ENCODER_ATTRIBUTE, None)
    encoders: dict[Path, CLIPImageEncoder] = {}
    adapters: list[IPAdapter] = []
    for value in values:
        option = parse_ip_adapter_option(value)
        try:
            try:
                folder = given or image_encoder_beside(option.weights)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{error} with --ip-adapter-encoder FOLDER") from None
            encoder: Path | CLIPImageEncoder = encoders.get(folder.resolve(), folder)
            adapter = IPAdapter.from_pretrained(unet, option.weights, image_encoder=encoder, scale=option.scale)
            encoders[folder.resolve()] = adapter.image_encoder
            image = open_image(option.image, f"--ip-adapter {value!r}: the image")
            adapter.set_image_embedding(adapter.compute_image_embedding([image]))
        except Exception as error:
            error.add_note(f"while loading --ip-adapter {value!r}")
            raise
        adapters.append(adapter)
    for adapter in adapters:
        adapter.inject()
