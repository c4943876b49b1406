"""`T2IAdapterConfig`, read from a diffusers `T2IAdapter` config, and the shape of the features each kind makes.

The three kinds of diffusers' `T2IAdapter` (`adapter_type`) differ in where they halve the size:

- `full_adapter` (SD1.5): one feature per entry of `channels`, the first at `1/downscale_factor` of the image,
  each next one at half the size of the previous one;
- `light_adapter` (SD1.5): one feature per entry of `channels` and one more, each at half the size of the previous;
- `full_adapter_xl` (SDXL): four features, the first two at `1/downscale_factor` (16), the last two at half that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refiners_sd15.config_values import check_fields, positive_int, positive_ints

ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")
"""The `adapter_type` values of diffusers' `T2IAdapter` config, all implemented here."""


@dataclass(frozen=True, kw_only=True)
class T2IAdapterConfig:
    """The architecture of a T2I-Adapter, as the fields of diffusers' `T2IAdapter` config (same names, same
    defaults: the SD1.5 full adapter of TencentARC/t2iadapter_*_sd14v1 and *_sd15v2)."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        check_fields(self)
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(
                f"adapter_type must be one of {', '.join(map(repr, ADAPTER_TYPES))}, got {self.adapter_type!r}"
            )
        if self.adapter_type == "full_adapter_xl" and (len(self.channels) != 4 or self.channels[2] != self.channels[3]):
            raise ValueError(
                f"channels of a full_adapter_xl must be 4 values, the last two equal, got {list(self.channels)}"
            )
        if self.adapter_type == "light_adapter" and any(channels % 4 for channels in self.channels):
            raise ValueError(f"channels of a light_adapter must be multiples of 4, got {list(self.channels)}")

    @property
    def stages(self) -> tuple[tuple[int, int, bool], ...]:
        """`(in_channels, out_channels, halves_the_size)` of each stage; stage `k` makes feature `k`. The light
        adapter's first stage reads the unshuffled image, the full adapters' read their `conv_in`'s output."""
        channels = self.channels
        if self.adapter_type == "light_adapter":
            inputs = (self.in_channels * self.downscale_factor**2, *channels)
            return tuple(
                (c_in, c_out, index > 0) for index, (c_in, c_out) in enumerate(zip(inputs, (*channels, channels[-1])))
            )
        if self.adapter_type == "full_adapter":
            inputs = (channels[0], *channels[:-1])
            return tuple((c_in, c_out, index > 0) for index, (c_in, c_out) in enumerate(zip(inputs, channels)))
        inputs = (channels[0], channels[0], channels[1], channels[3])  # diffusers' FullAdapterXL
        return tuple((c_in, c_out, index == 2) for index, (c_in, c_out) in enumerate(zip(inputs, channels)))

    @property
    def features(self) -> tuple[tuple[int, int], ...]:
        """`(channels, downscale)` of each feature, in order: its channels, and how many times smaller than the
        condition image it is."""
        features: list[tuple[int, int]] = []
        downscale = self.downscale_factor
        for _, channels, halves in self.stages:
            downscale *= 2 if halves else 1
            features.append((channels, downscale))
        return tuple(features)


SD15_FULL_ADAPTER = T2IAdapterConfig()
"""The full adapters of SD1.4 / SD1.5 (e.g. TencentARC/t2iadapter_canny_sd15v2, with `in_channels=1`)."""

SDXL_FULL_ADAPTER = T2IAdapterConfig(
    channels=(320, 640, 1280, 1280), downscale_factor=16, adapter_type="full_adapter_xl"
)
"""The adapters of SDXL (e.g. TencentARC/t2i-adapter-canny-sdxl-1.0)."""

_OTHER_KINDS = {
    "ControlNetModel": "a ControlNet (use refiners-controlnet)",
    "UNet2DConditionModel": "a UNet",
    "AutoencoderKL": "an autoencoder",
    "MultiAdapter": "a MultiAdapter (load each of its T2IAdapter folders instead)",
}


def t2i_adapter_config_from_diffusers(config: Mapping[str, Any]) -> T2IAdapterConfig:
    """The `T2IAdapterConfig` of a diffusers `T2IAdapter` config (`config.json`); absent fields take diffusers'
    defaults. Raises ValueError naming the field: a config of another model (`_class_name`), an unknown
    `adapter_type`, or a bad value."""
    class_name = config.get("_class_name", "T2IAdapter")
    if class_name != "T2IAdapter":
        kind = _OTHER_KINDS.get(str(class_name), "another model")
        raise ValueError(f"_class_name={class_name!r} is {kind}, not a T2I-Adapter (expected 'T2IAdapter')")
    return T2IAdapterConfig(
        in_channels=positive_int("in_channels", config.get("in_channels", 3)),
        channels=positive_ints("channels", config.get("channels", (320, 640, 1280, 1280))),
        num_res_blocks=positive_int("num_res_blocks", config.get("num_res_blocks", 2)),
        downscale_factor=positive_int("downscale_factor", config.get("downscale_factor", 8)),
        adapter_type=_adapter_type(config.get("adapter_type", "full_adapter")),
    )


def _adapter_type(value: object) -> str:
    if not isinstance(value, str) or value not in ADAPTER_TYPES:
        raise ValueError(f"adapter_type must be one of {', '.join(map(repr, ADAPTER_TYPES))}, got {value!r}")
    return value
