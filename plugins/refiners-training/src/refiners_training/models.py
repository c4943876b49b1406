"""The model kinds a LoRA trains on, `sd15` here and `sdxl` (`refiners_training.sdxl`, with refiners-sdxl installed):
what differs between them for training, behind one interface (`TrainedModel`), and how `model.kind` is told from
`model.base` (`resolve_kind`, as `refiners generate` tells it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from refiners_core.model_kinds import detect_model
from refiners_sd15 import CLIPTextEncoderL, SD1UNet, StableDiffusion_1
from refiners_sd15.latent_diffusion import LatentDiffusionModel
from refiners_training.config import ConfigError, LayerSelection, ModelConfig
from refiners_training.layers import TEXT_ATTENTION, select_layers, unet_patterns

TRAINED_KINDS = ("sd15", "sdxl")
"""The model kinds (names of `refiners_core.plugins` models) a LoRA trains on."""


class TrainedModel(ABC):
    """A loaded model as training sees it: `sd`, the layers a LoRA may target, the token ids of captions, the module
    whose forward pass is trained, and the conditions of an evaluation prompt."""

    kind: ClassVar[str]

    def __init__(self, sd: LatentDiffusionModel[Any]) -> None:
        self.sd = sd

    @classmethod
    @abstractmethod
    def load(cls, base: str, device: torch.device) -> TrainedModel:
        """Load `model.base` in float32 on `device` (the model's own errors name what is at fault)."""

    @abstractmethod
    def layer_paths(self, layers: LayerSelection, train_text_encoder: bool) -> list[str]:
        """The paths (relative to `sd`) of the layers to train, in model order (`refiners_training.layers`)."""

    @abstractmethod
    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """The token ids of `texts` (one row per text, one for a string): what the denoiser and `prompt_conditions`
        take."""

    @abstractmethod
    def denoiser(self, train_text_encoder: bool) -> nn.Module:
        """The trained computation, one module (so that DistributedDataParallel averages the gradients of every
        trained LoRA, text encoders included): `(noisy latents, timesteps (B,), token ids, time ids (B, 6))` -> the
        UNet's noise prediction. Time ids are SDXL's micro-conditioning (`CroppedImage.time_ids`)."""

    @abstractmethod
    def prompt_conditions(self, tokens: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
        """The keyword arguments of `sd`'s denoising step for the token ids of a negative and a positive prompt,
        for `size`x`size` images."""


class SD15Denoiser(nn.Module):
    """SD1.5's trained computation: captions -> CLIP text embedding -> the UNet's noise prediction (time ids unused:
    SD1.5 has no micro-conditioning)."""

    def __init__(self, unet: SD1UNet, clip_text_encoder: CLIPTextEncoderL, train_text_encoder: bool) -> None:
        super().__init__()
        self.unet = unet
        self.clip_text_encoder = clip_text_encoder
        self.train_text_encoder = train_text_encoder

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            embedding = self.clip_text_encoder(tokens)
        self.unet.set_timestep(timesteps)
        self.unet.set_clip_text_embedding(embedding)
        return self.unet(latents)


class SD15Model(TrainedModel):
    """Stable Diffusion 1.5: one CLIP text encoder, token ids `(N, 77)`."""

    kind = "sd15"
    sd: StableDiffusion_1

    @classmethod
    def load(cls, base: str, device: torch.device) -> SD15Model:
        return cls(StableDiffusion_1.from_pretrained(base, device=device, dtype=torch.float32))

    def layer_paths(self, layers: LayerSelection, train_text_encoder: bool) -> list[str]:
        text = [(self.sd.clip_text_encoder, [TEXT_ATTENTION])] if train_text_encoder else []
        return select_layers(self.sd, [(self.sd.unet, unet_patterns(layers)), *text])

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self.sd.clip_text_encoder.tokenizer(texts)

    def denoiser(self, train_text_encoder: bool) -> nn.Module:
        return SD15Denoiser(self.sd.unet, self.sd.clip_text_encoder, train_text_encoder)

    def prompt_conditions(self, tokens: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
        return {"clip_text_embedding": self.sd.clip_text_encoder(tokens)}


def resolve_kind(config: ModelConfig) -> type[TrainedModel]:
    """The `TrainedModel` of `model.kind`, or with `"auto"` of the kind `model.base` holds (what the registered
    models' `detect` recognize, as in `refiners generate`; SD1.5 when nothing tells, e.g. a hub id not yet cached).
    Reads no weight.

    Raises ConfigError naming `model.base` when it holds a model of another kind than `model.kind`, or one that no
    LoRA trains on (an SDXL refiner), and naming `model.kind` for `"sdxl"` without refiners-sdxl installed.
    """
    found = detect_model(config.base)
    if found is not None and found[0] not in TRAINED_KINDS:
        raise ConfigError(
            f"`model.base` {config.base} holds an {found[0]} model ({found[1]}): refiners-training trains LoRAs on "
            f"{' and '.join(TRAINED_KINDS)} models"
        )
    if config.kind != "auto" and found is not None and found[0] != config.kind:
        raise ConfigError(
            f"`model.kind` is {config.kind!r} but `model.base` {config.base} holds an {found[0]} model ({found[1]})"
        )
    kind = config.kind if config.kind != "auto" else found[0] if found is not None else "sd15"
    if kind == "sd15":
        return SD15Model
    try:
        from refiners_training.sdxl import SDXLModel
    except ImportError as error:
        raise ConfigError(
            f"`model.kind` 'sdxl' needs refiners-sdxl (pip install 'refiners-training[sdxl]'): {error}"
        ) from error
    return SDXLModel
