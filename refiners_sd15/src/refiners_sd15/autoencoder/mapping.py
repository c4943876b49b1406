"""Key mappings from autoencoder weight files to `SD1Autoencoder`.

Both formats are walked from the architecture itself: every layer of the autoencoder is listed once with its
diffusers name, its name in the original latent diffusion checkpoints ("ldm", keys of `first_stage_model.`
without that prefix) and its path in `SD1Autoencoder`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from refiners_sd15.autoencoder.config import (
    SD15_AUTOENCODER,
    AutoencoderConfig,
    autoencoder_config_from_diffusers,
    autoencoder_config_from_ldm,
)
from refiners_sd15.loading import ComponentFormat

LayerNames = tuple[str, str, str]
"""(diffusers layer, ldm layer, our layer) of one layer holding a weight and a bias."""

_RESIDUAL_LAYERS = (
    ("norm1", "norm1", "Chain.GroupNorm_1"),
    ("conv1", "conv1", "Chain.Conv2d_1"),
    ("norm2", "norm2", "Chain.GroupNorm_2"),
    ("conv2", "conv2", "Chain.Conv2d_2"),
)
_ATTENTION_LAYERS = (
    ("group_norm", "norm", "GroupNorm"),
    ("to_q", "q", "SelfAttention2d.Distribute.Linear_1"),
    ("to_k", "k", "SelfAttention2d.Distribute.Linear_2"),
    ("to_v", "v", "SelfAttention2d.Distribute.Linear_3"),
    ("to_out.0", "proj_out", "SelfAttention2d.Linear"),
)


def diffusers_autoencoder_mapping(config: AutoencoderConfig = SD15_AUTOENCODER) -> dict[str, str]:
    """diffusers `AutoencoderKL` state_dict key -> `SD1Autoencoder` state_dict key, for the autoencoder `config`
    describes (its `block_out_channels` and `layers_per_block` shape the mapping)."""
    return {
        f"{diffusers}.{param}": f"{ours}.{param}"
        for diffusers, _, ours in _layers(config.block_out_channels, config.layers_per_block)
        for param in ("weight", "bias")
    }


def ldm_autoencoder_mapping(config: AutoencoderConfig = SD15_AUTOENCODER) -> dict[str, str]:
    """Original (CompVis/ldm single-file) autoencoder key -> `SD1Autoencoder` state_dict key.

    Keys are those of the `first_stage_model.` part of a checkpoint, without that prefix (`encoder.down.0...`).
    The attention projections (`mid.attn_1.q`...) are stored there as 1x1 convolution kernels of shape
    `(C, C, 1, 1)`; `load_state_dict_checked` loads them into our linear layers as they are.
    """
    return {
        f"{ldm}.{param}": f"{ours}.{param}"
        for _, ldm, ours in _layers(config.block_out_channels, config.layers_per_block)
        for param in ("weight", "bias")
    }


def _layers(block_out_channels: Sequence[int], layers_per_block: int) -> Iterator[LayerNames]:
    num_blocks = len(block_out_channels)
    yield "encoder.conv_in", "encoder.conv_in", "Encoder.Conv2d"
    for i in range(num_blocks):
        in_channels = block_out_channels[max(i - 1, 0)]
        block = f"Encoder.{_nth('DownBlock', i, num_blocks)}"
        for j in range(layers_per_block):
            yield from _residual(
                f"encoder.down_blocks.{i}.resnets.{j}",
                f"encoder.down.{i}.block.{j}",
                f"{block}.{_nth('ResidualBlock', j, layers_per_block)}",
                shortcut=j == 0 and in_channels != block_out_channels[i],
            )
        if i < num_blocks - 1:
            yield (
                f"encoder.down_blocks.{i}.downsamplers.0.conv",
                f"encoder.down.{i}.downsample.conv",
                f"{block}.Downsample.Conv2d",
            )
    yield from _mid_block("encoder", "Encoder")
    yield "encoder.conv_norm_out", "encoder.norm_out", "Encoder.OutputBlock.GroupNorm"
    yield "encoder.conv_out", "encoder.conv_out", "Encoder.OutputBlock.Conv2d"
    yield "quant_conv", "quant_conv", "Encoder.PosteriorMean.Conv2d"

    yield "post_quant_conv", "post_quant_conv", "Decoder.Conv2d_1"
    yield "decoder.conv_in", "decoder.conv_in", "Decoder.Conv2d_2"
    yield from _mid_block("decoder", "Decoder")
    reversed_channels = list(reversed(block_out_channels))
    for i in range(num_blocks):
        in_channels = reversed_channels[max(i - 1, 0)]
        ldm_index = num_blocks - 1 - i  # the original numbers the decoder stages from the highest resolution
        block = f"Decoder.{_nth('UpBlock', i, num_blocks)}"
        for j in range(layers_per_block + 1):
            yield from _residual(
                f"decoder.up_blocks.{i}.resnets.{j}",
                f"decoder.up.{ldm_index}.block.{j}",
                f"{block}.{_nth('ResidualBlock', j, layers_per_block + 1)}",
                shortcut=j == 0 and in_channels != reversed_channels[i],
            )
        if i < num_blocks - 1:
            yield (
                f"decoder.up_blocks.{i}.upsamplers.0.conv",
                f"decoder.up.{ldm_index}.upsample.conv",
                f"{block}.Upsample.Conv2d",
            )
    yield "decoder.conv_norm_out", "decoder.norm_out", "Decoder.OutputBlock.GroupNorm"
    yield "decoder.conv_out", "decoder.conv_out", "Decoder.OutputBlock.Conv2d"


def _residual(diffusers: str, ldm: str, ours: str, shortcut: bool) -> Iterator[LayerNames]:
    for diffusers_name, ldm_name, our_name in _RESIDUAL_LAYERS:
        yield f"{diffusers}.{diffusers_name}", f"{ldm}.{ldm_name}", f"{ours}.{our_name}"
    if shortcut:
        yield f"{diffusers}.conv_shortcut", f"{ldm}.nin_shortcut", f"{ours}.Conv2d"


def _mid_block(diffusers_part: str, our_part: str) -> Iterator[LayerNames]:
    diffusers, ldm, ours = f"{diffusers_part}.mid_block", f"{diffusers_part}.mid", f"{our_part}.MidBlock"
    yield from _residual(f"{diffusers}.resnets.0", f"{ldm}.block_1", f"{ours}.ResidualBlock_1", shortcut=False)
    for diffusers_name, ldm_name, our_name in _ATTENTION_LAYERS:
        yield (
            f"{diffusers}.attentions.0.{diffusers_name}",
            f"{ldm}.attn_1.{ldm_name}",
            f"{ours}.AttentionBlock.{our_name}",
        )
    yield from _residual(f"{diffusers}.resnets.1", f"{ldm}.block_2", f"{ours}.ResidualBlock_2", shortcut=False)


def _nth(name: str, index: int, count: int) -> str:
    """The name a Chain gives to the index-th of `count` children of the same class."""
    return name if count == 1 else f"{name}_{index + 1}"


AUTOENCODER_FORMAT = ComponentFormat(
    name="autoencoder",
    subfolder="vae",
    weight_stems=("diffusion_pytorch_model",),
    config_class=AutoencoderConfig,
    config_from_diffusers=autoencoder_config_from_diffusers,
    diffusers_mapping=lambda config, file_keys: diffusers_autoencoder_mapping(config),
    single_file_prefix="first_stage_model.",
    single_file_mapping=ldm_autoencoder_mapping,
    single_file_config=autoencoder_config_from_ldm,
)
