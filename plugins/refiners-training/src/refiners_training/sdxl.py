"""LoRA training on Stable Diffusion XL (base), with refiners-sdxl installed (the `sdxl` extra): imported only for a
run whose `model.kind` is, or is detected as, `sdxl`.

The trained computation is SDXL's training objective as its published training scripts have it: both text encoders
(CLIP-L's and CLIP-G's penultimate hidden states side by side, CLIP-G's projected pooled embedding) and the
micro-conditioning of each image, its original size, crop and target size (`CroppedImage.time_ids`).
"""

from __future__ import annotations

import torch
from torch import nn

from refiners_sd15.clip import CLIPTextEncoderG, CLIPTextEncoderL
from refiners_sdxl import SDXLUNet, StableDiffusion_XL
from refiners_training.config import LayerSelection
from refiners_training.layers import TEXT_ATTENTION, select_layers, text_attention, unet_patterns
from refiners_training.models import TrainedModel


class SDXLDenoiser(nn.Module):
    """SDXL's trained computation: token ids `(B, 2, 77)` (CLIP-L's, then CLIP-G's) -> text and pooled text
    embeddings; with the time ids `(B, 6)` and timesteps, the UNet's noise prediction for the noisy latents."""

    def __init__(
        self,
        unet: SDXLUNet,
        text_encoder_l: CLIPTextEncoderL,
        text_encoder_g: CLIPTextEncoderG,
        train_text_encoder: bool,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder_l = text_encoder_l
        self.text_encoder_g = text_encoder_g
        self.train_text_encoder = train_text_encoder

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            embedding, pooled = encode(self.text_encoder_l, self.text_encoder_g, tokens)
        self.unet.set_timestep(timesteps)
        self.unet.set_clip_text_embedding(embedding)
        self.unet.set_pooled_text_embedding(pooled)
        self.unet.set_time_ids(time_ids.to(dtype=latents.dtype))
        return self.unet(latents)


def encode(
    text_encoder_l: CLIPTextEncoderL, text_encoder_g: CLIPTextEncoderG, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embedding `(B, 77, L + G)` and pooled text embedding `(B, pooled)` of token ids `(B, 2, 77)`, as
    `DoubleTextEncoder` computes them from prompts (each encoder on the ids of its own tokenizer)."""
    hidden_l, _ = text_encoder_l(tokens[:, 0])
    hidden_g, pooled = text_encoder_g(tokens[:, 1])
    return torch.cat((hidden_l, hidden_g), dim=-1), pooled


class SDXLModel(TrainedModel):
    """Stable Diffusion XL (base): two CLIP text encoders, token ids `(N, 2, 77)`, micro-conditioning time ids."""

    kind = "sdxl"
    sd: StableDiffusion_XL

    @classmethod
    def load(cls, base: str, device: torch.device) -> SDXLModel:
        return cls(StableDiffusion_XL.from_pretrained(base, device=device, dtype=torch.float32))

    def layer_paths(self, layers: LayerSelection, train_text_encoder: bool) -> list[str]:
        """As SD1.5's, on both text encoders but CLIP-L's last layer: SDXL reads CLIP-L's penultimate hidden states
        (a LoRA there would never train, and DistributedDataParallel refuses parameters without gradients)."""
        encoders = self.sd.clip_text_encoder
        penultimate = text_attention(but_layer=encoders.text_encoder_l.config.num_layers - 1)
        text = [(encoders.text_encoder_l, [penultimate]), (encoders.text_encoder_g, [TEXT_ATTENTION])]
        return select_layers(self.sd, [(self.sd.unet, unet_patterns(layers)), *(text if train_text_encoder else [])])

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        encoders = self.sd.clip_text_encoder
        return torch.stack((encoders.text_encoder_l.tokenizer(texts), encoders.text_encoder_g.tokenizer(texts)), 1)

    def denoiser(self, train_text_encoder: bool) -> nn.Module:
        encoders = self.sd.clip_text_encoder
        return SDXLDenoiser(self.sd.unet, encoders.text_encoder_l, encoders.text_encoder_g, train_text_encoder)

    def prompt_conditions(self, tokens: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
        encoders = self.sd.clip_text_encoder
        embedding, pooled = encode(encoders.text_encoder_l, encoders.text_encoder_g, tokens)
        time_ids = self.sd.time_ids(original_size=(size, size), target_size=(size, size))
        return {"clip_text_embedding": embedding, "pooled_text_embedding": pooled, "time_ids": time_ids}
