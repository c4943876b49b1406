"""`SDXLUNet`: the denoising UNet of Stable Diffusion XL, built from refiners-sd15's UNet blocks.

What SDXL adds to SD1.5's UNet is its config (heads and transformer depths per level, no attention on the first
level: see `refiners_sdxl.config`) and the `text_time` added embedding, `TextTimeEmbedding`, which adds the
embedding of the pooled text embedding and the micro-conditioning time ids to the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_core.layer_blocks import LayerBlock
from refiners_core.module_names import DIFFUSERS, KOHYA, kohya_names, module_names
from refiners_sd15.loading import PretrainedComponent
from refiners_sd15.unet import (
    UNET_FORMAT,
    DownBlocks,
    MiddleBlock,
    OutputBlock,
    SinusoidalEmbedding,
    TimestepEncoder,
    UNetConfig,
    UpBlocks,
    diffusers_unet_mapping,
    ldm_unet_mapping,
    unet_layer_blocks,
)
from refiners_sdxl.config import SDXL_BASE_UNET


class TimeIdsEmbedding(SinusoidalEmbedding):
    """Encode each of the `(B, N)` time ids as `dim` sinusoidal features, concatenated: `(B, N * dim)`."""

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep).reshape(timestep.shape[0], -1)


class TextTimeEmbedding(fl.Passthrough):
    """SDXL's `text_time` added embedding: `unet.timestep_embedding += MLP([pooled_text_embedding, time_ids])`.

    The `diffusion` context gives the pooled text embedding `(B, pooled_dim)` and the time ids `(B, N)`, each id
    embedded as `time_ids_dim` sinusoids; `input_dim = pooled_dim + N * time_ids_dim`. The MLP is
    `Linear -> SiLU -> Linear` to the timestep embedding's `embedding_dim`.
    """

    def __init__(
        self,
        input_dim: int,
        embedding_dim: int,
        time_ids_dim: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.UseContext("unet", "timestep_embedding"),
            fl.Residual(
                fl.Concatenate(
                    fl.UseContext("diffusion", "pooled_text_embedding"),
                    fl.Chain(
                        fl.UseContext("diffusion", "time_ids"),
                        TimeIdsEmbedding(time_ids_dim, device=device, dtype=dtype),
                    ),
                    dim=1,
                ),
                fl.Linear(input_dim, embedding_dim, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype),
            ),
            fl.SetContext("unet", "timestep_embedding"),
        )


_ADDED_EMBEDDING = "TextTimeEmbedding.Residual"
# The added embedding's MLP: (diffusers, ldm, ours), each followed by ".weight" and ".bias".
_ADDED_EMBEDDING_KEYS = (
    ("add_embedding.linear_1", "label_emb.0.0", f"{_ADDED_EMBEDDING}.Linear_1"),
    ("add_embedding.linear_2", "label_emb.0.2", f"{_ADDED_EMBEDDING}.Linear_2"),
)


def diffusers_sdxl_unet_mapping(config: UNetConfig = SDXL_BASE_UNET) -> dict[str, str]:
    """Diffusers `UNet2DConditionModel` state dict key -> `SDXLUNet` state dict key, for the UNet `config` describes.

    refiners-sd15's UNet mapping (the shape of `config` gives the levels, blocks and transformer depths), plus the
    added embedding (`add_embedding.linear_1` / `linear_2`).
    """
    mapping = diffusers_unet_mapping(config)
    for diffusers, _, ours in _ADDED_EMBEDDING_KEYS:
        mapping |= {f"{diffusers}.{suffix}": f"{ours}.{suffix}" for suffix in ("weight", "bias")}
    return mapping


def ldm_sdxl_unet_mapping(config: UNetConfig = SDXL_BASE_UNET) -> dict[str, str]:
    """Original checkpoint UNet key, without its `model.diffusion_model.` prefix -> `SDXLUNet` state dict key.

    As `diffusers_sdxl_unet_mapping`, with the added embedding's `label_emb.0.0` / `label_emb.0.2`.
    """
    mapping = ldm_unet_mapping(config)
    for _, ldm, ours in _ADDED_EMBEDDING_KEYS:
        mapping |= {f"{ldm}.{suffix}": f"{ours}.{suffix}" for suffix in ("weight", "bias")}
    return mapping


def _diffusers_sdxl_unet_mapping(config: UNetConfig, file_keys: Collection[str]) -> dict[str, str]:
    return diffusers_sdxl_unet_mapping(config)


SDXL_UNET_FORMAT = replace(
    UNET_FORMAT,
    diffusers_mapping=_diffusers_sdxl_unet_mapping,
    single_file_mapping=ldm_sdxl_unet_mapping,
)
"""How an SDXL UNet is stored: diffusers' `unet/` folder (config and weights), or our own file (`save`)."""


class SDXLUNet(PretrainedComponent, fl.Chain):
    """The Stable Diffusion XL UNet: predicts the noise in a latent, given a timestep, the text embeddings of both
    CLIP encoders and the micro-conditioning time ids.

        unet = SDXLUNet()  # SDXL base; SDXLUNet(SDXL_REFINER_UNET), SDXLUNet(SDXL_INPAINTING_UNET)
        unet.set_timestep(torch.tensor([999]))
        unet.set_clip_text_embedding(text_embedding)  # (B, 77, 2048)
        unet.set_pooled_text_embedding(pooled_text_embedding)  # (B, 1280)
        unet.set_time_ids(time_ids)  # (B, 6): original size, crop top-left, target size, as (height, width)
        noise = unet(latents)  # (B, 4, H, W)

    The blocks are refiners-sd15's (`TimestepEncoder`, `DownBlocks`, `MiddleBlock`, `UpBlocks`, `OutputBlock`)
    built from `config` (a `UNetConfig`, kept as `unet.config`), with `TextTimeEmbedding` after the timestep
    encoder. Every parameter and buffer is created on `device` with `dtype`. Raises ValueError for a config
    without the `text_time` added embedding (an SD1.5 UNet: use `refiners_sd15.SD1UNet`).
    """

    component_format = SDXL_UNET_FORMAT

    def __init__(
        self, config: UNetConfig = SDXL_BASE_UNET, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        if config.addition_embed_type != "text_time":
            raise ValueError(
                f"SDXLUNet needs the 'text_time' added embedding, the config gives addition_embed_type="
                f"{config.addition_embed_type!r} (an SD1.5 UNet: use refiners_sd15.SD1UNet)"
            )
        assert config.projection_class_embeddings_input_dim is not None and config.addition_time_embed_dim is not None
        self.config = config
        channels = config.block_out_channels
        embedding_dim = 4 * channels[0]
        super().__init__(
            TimestepEncoder(channels[0], embedding_dim, device=device, dtype=dtype),
            TextTimeEmbedding(
                config.projection_class_embeddings_input_dim,
                embedding_dim,
                config.addition_time_embed_dim,
                device=device,
                dtype=dtype,
            ),
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
        self.use_context("unet").clear()  # no skip connection kept alive between steps (as SD1UNet)
        return noise

    def set_timestep(self, timestep: torch.Tensor) -> None:
        """Set the diffusion timestep: a scalar, or one per sample of the batch (shape `()`, `(1,)` or `(B,)`)."""
        self.set_context("diffusion", {"timestep": timestep})

    def set_clip_text_embedding(self, clip_text_embedding: torch.Tensor) -> None:
        """Set the text embedding `(B, tokens, cross_attention_dim)` the cross-attention layers attend to (SDXL base:
        CLIP-L's and CLIP-G's penultimate hidden states concatenated, 768 + 1280)."""
        self.set_context("diffusion", {"clip_text_embedding": clip_text_embedding})

    def set_pooled_text_embedding(self, pooled_text_embedding: torch.Tensor) -> None:
        """Set the pooled text embedding `(B, pooled_dim)` of the added embedding (CLIP-G's projected one, 1280)."""
        self.set_context("diffusion", {"pooled_text_embedding": pooled_text_embedding})

    def set_time_ids(self, time_ids: torch.Tensor) -> None:
        """Set the micro-conditioning time ids `(B, N)`, in diffusers' order: for the base, `(original height,
        original width, crop top, crop left, target height, target width)`; for the refiner, the aesthetic score
        replaces the target size."""
        self.set_context("diffusion", {"time_ids": time_ids})

    def layer_blocks(self) -> dict[str, LayerBlock]:
        """Layer path -> its block (component `unet`), for per-block LoRA weights (the `LayerBlocks` protocol)."""
        return unet_layer_blocks(self.foreign_module_names(DIFFUSERS))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        """diffusers or kohya module name -> our layer path (the `ForeignModuleNames` protocol, for LoRA files).

        `DIFFUSERS` names are `UNet2DConditionModel` module paths; `KOHYA` names are `lora_unet_` + those paths
        with `_` for `.`, or + the original checkpoint's paths. Built from the same mappings as `from_pretrained`.
        """
        diffusers = module_names(diffusers_sdxl_unet_mapping(self.config))
        if convention == DIFFUSERS:
            return diffusers
        if convention == KOHYA:
            ldm = module_names(ldm_sdxl_unet_mapping(self.config))
            return kohya_names(diffusers, "lora_unet_") | kohya_names(ldm, "lora_unet_")
        return {}
