"""`SD1UNet`: the denoising UNet of Stable Diffusion 1.5."""

from __future__ import annotations

from typing import Any

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_core.layer_blocks import LayerBlock
from refiners_core.module_names import DIFFUSERS, KOHYA, kohya_names, module_names
from refiners_sd15.loading import PretrainedComponent
from refiners_sd15.unet.blocks import (
    ConcatenateSkip,
    CrossAttentionBlock2d,
    ResidualBlock,
    SaveSkip,
    TimestepEncoder,
    Upsample,
)
from refiners_sd15.unet.config import SD15_UNET, UNetConfig, skip_channels
from refiners_sd15.unet.layer_blocks import unet_layer_blocks
from refiners_sd15.unet.mapping import UNET_FORMAT, diffusers_unet_mapping, ldm_unet_mapping


def _attention_block(
    config: UNetConfig, level: int, device: Device = None, dtype: torch.dtype | None = None
) -> CrossAttentionBlock2d:
    """The spatial transformer of `level` (-1: the middle block's), with that level's heads and depth."""
    return CrossAttentionBlock2d(
        config.block_out_channels[level],
        config.num_heads(level),
        config.cross_attention_dim,
        config.norm_num_groups,
        device=device,
        dtype=dtype,
        depth=config.transformer_depth(level),
    )


class DownBlocks(fl.Chain):
    """The encoder path: the input convolution, then per level residual (+ attention) blocks and a downsample.

    One chain per stored skip connection (chain `k + 1` stores `skip_k`), in the order of the original
    checkpoint's `input_blocks`.
    """

    def __init__(self, config: UNetConfig, device: Device = None, dtype: torch.dtype | None = None) -> None:
        block_out_channels, layers_per_block = config.block_out_channels, config.layers_per_block
        num_groups, eps = config.norm_num_groups, config.norm_eps
        embedding_dim = 4 * block_out_channels[0]
        stages: list[fl.Chain] = [
            fl.Chain(
                fl.Conv2d(
                    config.in_channels, block_out_channels[0], kernel_size=3, padding=1, device=device, dtype=dtype
                )
            )
        ]
        channels = block_out_channels[0]
        for level, level_channels in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                stage = fl.Chain(
                    ResidualBlock(channels, level_channels, embedding_dim, num_groups, eps, device=device, dtype=dtype)
                )
                if config.cross_attention_levels[level]:
                    stage.append(_attention_block(config, level, device=device, dtype=dtype))
                stages.append(stage)
                channels = level_channels
            if level < len(block_out_channels) - 1:
                stages.append(fl.Chain(fl.Downsample(channels, padding=1, device=device, dtype=dtype)))
        for index, stage in enumerate(stages):
            stage.append(SaveSkip(index))
        super().__init__(stages)


class MiddleBlock(fl.Chain):
    """Residual block, cross-attention block, residual block, at the lowest resolution."""

    def __init__(self, config: UNetConfig, device: Device = None, dtype: torch.dtype | None = None) -> None:
        channels, embedding_dim = config.block_out_channels[-1], 4 * config.block_out_channels[0]
        num_groups, eps = config.norm_num_groups, config.norm_eps
        super().__init__(
            ResidualBlock(channels, channels, embedding_dim, num_groups, eps, device=device, dtype=dtype),
            _attention_block(config, -1, device=device, dtype=dtype),
            ResidualBlock(channels, channels, embedding_dim, num_groups, eps, device=device, dtype=dtype),
        )


class UpBlocks(fl.Chain):
    """The decoder path: per level, residual (+ attention) blocks that each take one skip connection, then an upsample.

    Chain `m + 1` concatenates the skip connections in reverse order of the down path, in the order of the
    original checkpoint's `output_blocks`.
    """

    def __init__(self, config: UNetConfig, device: Device = None, dtype: torch.dtype | None = None) -> None:
        block_out_channels, layers_per_block = config.block_out_channels, config.layers_per_block
        num_groups, eps = config.norm_num_groups, config.norm_eps
        embedding_dim = 4 * block_out_channels[0]
        skips = skip_channels(block_out_channels, layers_per_block)
        skip_index = len(skips) - 1
        channels = block_out_channels[-1]
        stages: list[fl.Chain] = []
        for level in reversed(range(len(block_out_channels))):
            level_channels = block_out_channels[level]
            for _ in range(layers_per_block + 1):
                stage = fl.Chain(
                    ConcatenateSkip(skip_index),
                    ResidualBlock(
                        channels + skips[skip_index],
                        level_channels,
                        embedding_dim,
                        num_groups,
                        eps,
                        device=device,
                        dtype=dtype,
                    ),
                )
                if config.cross_attention_levels[level]:
                    stage.append(_attention_block(config, level, device=device, dtype=dtype))
                stages.append(stage)
                channels = level_channels
                skip_index -= 1
            if level > 0:
                stages[-1].append(Upsample(channels, skip_index, device=device, dtype=dtype))
        super().__init__(stages)


class OutputBlock(fl.Chain):
    """`GroupNorm -> SiLU -> 3x3 Conv2d` down to the predicted noise's channels."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        num_groups: int,
        eps: float,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.GroupNorm(channels, num_groups, eps=eps, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
        )


class SD1UNet(PretrainedComponent, fl.Chain):
    """The Stable Diffusion 1.5 UNet: predicts the noise in a latent, given a timestep and a CLIP text embedding.

        unet = SD1UNet()  # SD1.5; SD1UNet(SD15_INPAINTING_UNET) for the inpainting model
        unet.set_timestep(torch.tensor([999]))
        unet.set_clip_text_embedding(text_embedding)  # (B, 77, 768)
        noise = unet(latents)  # (B, 4, H, W)

    Its architecture is `config` (a `UNetConfig`, kept as `unet.config`). Every parameter and buffer is created on
    `device` with `dtype`. Raises ValueError for a config with an added embedding (SDXL's: see refiners-sdxl).
    """

    component_format = UNET_FORMAT

    def __init__(self, config: UNetConfig = SD15_UNET, device: Device = None, dtype: torch.dtype | None = None) -> None:
        if config.addition_embed_type is not None:
            raise ValueError(
                f"SD1UNet has no added embedding, the config gives addition_embed_type={config.addition_embed_type!r} "
                "(an SDXL UNet: use refiners_sdxl.SDXLUNet)"
            )
        self.config = config
        channels = config.block_out_channels
        super().__init__(
            TimestepEncoder(channels[0], 4 * channels[0], device=device, dtype=dtype),
            DownBlocks(config, device=device, dtype=dtype),
            MiddleBlock(config, device=device, dtype=dtype),
            UpBlocks(config, device=device, dtype=dtype),
            OutputBlock(
                channels[0], config.out_channels, config.norm_num_groups, config.norm_eps, device=device, dtype=dtype
            ),
        )

    def init_context(self) -> fl.Contexts:
        return {"diffusion": {}, "unet": {}}

    def forward(self, *args: Any) -> torch.Tensor:
        noise = super().forward(*args)
        # The skip connections are not kept alive between steps, and every call starts from the same empty
        # context, which `torch.compile`'s guards check: a second call then needs no recompilation.
        self.use_context("unet").clear()
        return noise

    def set_timestep(self, timestep: torch.Tensor) -> None:
        """Set the diffusion timestep: a scalar, or one per sample of the batch (shape `()`, `(1,)` or `(B,)`)."""
        self.set_context("diffusion", {"timestep": timestep})

    def set_clip_text_embedding(self, clip_text_embedding: torch.Tensor) -> None:
        """Set the CLIP text embedding `(B, tokens, cross_attention_dim)` the cross-attention layers attend to."""
        self.set_context("diffusion", {"clip_text_embedding": clip_text_embedding})

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        """diffusers or kohya module name -> our layer path (the `ForeignModuleNames` protocol, for LoRA files).

        `DIFFUSERS` names are `UNet2DConditionModel` module paths (`down_blocks.0.attentions.0.proj_in`); `KOHYA`
        names are `lora_unet_` + those paths with `_` for `.`, or + the original checkpoint's paths
        (`lora_unet_input_blocks_1_1_proj_in`). Built from the same mappings as `from_pretrained`.
        """
        diffusers = module_names(diffusers_unet_mapping(self.config))
        if convention == DIFFUSERS:
            return diffusers
        if convention == KOHYA:
            ldm = module_names(ldm_unet_mapping(self.config))
            return kohya_names(diffusers, "lora_unet_") | kohya_names(ldm, "lora_unet_")
        return {}

    def layer_blocks(self) -> dict[str, LayerBlock]:
        """Layer path -> its block (component `unet`), for per-block LoRA weights (the `LayerBlocks` protocol)."""
        return unet_layer_blocks(self.foreign_module_names(DIFFUSERS))

    def foreign_pointwise_convolutions(self, convention: str) -> set[str]:
        """The foreign names of the spatial transformers' `proj_in` / `proj_out`: our Linears, 1x1 convolutions in
        SD1 (the `ForeignPointwiseConvolutions` protocol, so that LoRAs are written in the shape others load); none
        when the config has `use_linear_projection`."""
        if self.config.use_linear_projection:
            return set()
        return {name for name in self.foreign_module_names(convention) if name.endswith(("proj_in", "proj_out"))}
