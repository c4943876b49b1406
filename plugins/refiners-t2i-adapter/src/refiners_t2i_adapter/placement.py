"""Where a T2I-Adapter's features go in a UNet: the places of diffusers' `down_intrablock_additional_residuals`.

In diffusers' `UNet2DConditionModel`, feature `k` is added in down level `k`: after its last transformer for a level
with cross-attention (before its downsampling: the level's last skip connection and what goes on down both get it),
after the whole level for one without (after its downsampling if it has one). A feature left over after the down
levels goes after the middle block (SDXL's adapters: their fourth feature). In our UNets (refiners-sd15's
`DownBlocks`, one chain per skip connection), that is before the `SaveSkip` of one chain of `DownBlocks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from refiners_sd15.unet import UNetConfig
from refiners_t2i_adapter.config import T2IAdapterConfig

LATENT_DOWNSCALE = 8
"""How many times smaller than the image the latents of SD1.5 and SDXL are (their autoencoders')."""


@dataclass(frozen=True)
class FeaturePlace:
    """Where one feature is added: before the `SaveSkip` of `DownBlocks` chain `stage`, or after the middle block
    (`stage` None); the UNet's `channels` there, and how many times smaller than the image it is (`downscale`)."""

    stage: int | None
    channels: int
    downscale: int

    @property
    def name(self) -> str:
        return "after the middle block" if self.stage is None else f"in DownBlocks.Chain_{self.stage + 1}"


def feature_places(config: UNetConfig) -> list[FeaturePlace]:
    """The places of the UNet `config` describes, in the order features go to them: one per down level, then
    after the middle block."""
    places: list[FeaturePlace] = []
    levels = len(config.block_out_channels)
    stage = 0  # the input convolution's chain
    for level, channels in enumerate(config.block_out_channels):
        stage += config.layers_per_block
        downscale = LATENT_DOWNSCALE * 2**level
        if level == levels - 1 or config.cross_attention_levels[level]:
            places.append(FeaturePlace(stage, channels, downscale))
        else:  # diffusers' DownBlock2D: after its downsampling
            places.append(FeaturePlace(stage + 1, channels, 2 * downscale))
        stage += level < levels - 1
    places.append(FeaturePlace(None, config.block_out_channels[-1], LATENT_DOWNSCALE * 2 ** (levels - 1)))
    return places


def check_fits(adapter: T2IAdapterConfig, unet: UNetConfig, what: str, where: str) -> list[FeaturePlace]:
    """The places of the adapter's features in the UNet; raises ValueError naming `what` (the adapter), the feature,
    `where` (the UNet) and the fields at fault if a feature has no place of its channels and size."""
    places = feature_places(unet)
    kind = "an SDXL UNet" if unet.addition_embed_type == "text_time" else "an SD1.5-like UNet"
    header = (
        f"{what} (adapter_type={adapter.adapter_type!r}, channels={list(adapter.channels)}, "
        f"downscale_factor={adapter.downscale_factor}) does not fit the UNet at `{where}` ({kind}, block_out_channels="
        f"{list(unet.block_out_channels)})"
    )
    features = adapter.features
    if len(features) > len(places):
        raise ValueError(f"{header}: it makes {len(features)} features, the UNet has {len(places)} places for them")
    for index, ((channels, downscale), place) in enumerate(zip(features, places)):
        if (channels, downscale) != (place.channels, place.downscale):
            raise ValueError(
                f"{header}: its feature {index} has {channels} channels at 1/{downscale} of the image size, the UNet "
                f"takes {place.channels} channels at 1/{place.downscale} {place.name}"
            )
    return places[: len(features)]
