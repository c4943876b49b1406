"""`AutoencoderConfig`, the shape of a Stable Diffusion autoencoder, with SD1.5's values; read from a diffusers
`config.json` or from the tensors of an original checkpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """The shape of a diffusers `AutoencoderKL` of the Stable Diffusion family, in the names of its config.

    `block_out_channels` are the encoder's levels (the decoder mirrors them); each encoder level has
    `layers_per_block` residual blocks, each decoder level one more. Latents are scaled by `scaling_factor`, as the
    diffusion model expects them (SDXL's autoencoder is the same with `scaling_factor=0.13025`).
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float


SD15_AUTOENCODER = AutoencoderConfig(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.18215
)
"""The autoencoder of Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5, `vae/config.json`)."""


_IGNORED_FIELDS = {"sample_size", "force_upcast"}
"""Fields of a diffusers config that do not change the model (tiling size, fp16 upcasting advice)."""


def autoencoder_config_from_diffusers(config: dict[str, Any]) -> AutoencoderConfig:
    """The `AutoencoderConfig` of the `config.json` of a diffusers `AutoencoderKL` (e.g. `vae/`).

    Raises ValueError naming the field when the configuration describes an architecture `SD1Autoencoder`
    does not implement (another class, activation, block type, channel count, latent shift or normalisation...).
    """
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"autoencoder config: '_class_name' is {class_name!r}, only 'AutoencoderKL' is supported")
    block_out_channels = [int(c) for c in config.get("block_out_channels", (64,))]
    supported: dict[str, tuple[Any, ...]] = {
        "in_channels": (3,),
        "out_channels": (3,),
        "act_fn": ("silu",),
        "down_block_types": (["DownEncoderBlock2D"] * len(block_out_channels),),
        "up_block_types": (["UpDecoderBlock2D"] * len(block_out_channels),),
        "shift_factor": (None, 0.0),
        "latents_mean": (None,),
        "latents_std": (None,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
    }
    read: dict[str, Any] = {
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": int(config.get("layers_per_block", 1)),
        "latent_channels": int(config.get("latent_channels", 4)),
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "scaling_factor": float(config.get("scaling_factor", 0.18215)),
    }
    for field, value in config.items():
        if field.startswith("_") or field in _IGNORED_FIELDS or field in read:
            continue
        if field not in supported:
            raise ValueError(f"autoencoder config: unknown field {field!r} (value {value!r}) is not supported")
        if (list(cast(Sequence[Any], value)) if isinstance(value, list | tuple) else value) not in supported[field]:
            accepted = " or ".join(repr(v) for v in supported[field])
            raise ValueError(f"autoencoder config: {field}={value!r} is not supported (supported: {accepted})")
    for channels in block_out_channels:
        if channels % read["norm_num_groups"]:
            raise ValueError(
                f"autoencoder config: block_out_channels {block_out_channels} are not all divisible by "
                f"norm_num_groups={read['norm_num_groups']}"
            )
    return AutoencoderConfig(**read)


def autoencoder_config_from_ldm(tensors: Mapping[str, torch.Tensor]) -> AutoencoderConfig:
    """The `AutoencoderConfig` read from the shapes of an original checkpoint's autoencoder tensors.

    Keys are without the `first_stage_model.` prefix. Normalisation groups and the scaling factor are not stored
    in the weights: they are SD1's (32 and 0.18215). Raises ValueError for a tensor set that is not an autoencoder.
    """
    if "encoder.conv_in.weight" not in tensors or "quant_conv.weight" not in tensors:
        raise ValueError("not an autoencoder checkpoint: no 'encoder.conv_in.weight' or 'quant_conv.weight'")
    levels = sorted({int(match.group(1)) for key in tensors if (match := re.match(r"encoder\.down\.(\d+)\.", key))})
    blocks = {int(match.group(1)) for key in tensors if (match := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    return AutoencoderConfig(
        block_out_channels=tuple(tensors[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] for level in levels),
        layers_per_block=len(blocks),
        latent_channels=tensors["quant_conv.weight"].shape[0] // 2,
        scaling_factor=SD15_AUTOENCODER.scaling_factor,
    )
