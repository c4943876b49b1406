"""SDXL's text conditioning, built of two CLIP text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14."""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_sd15.clip.config import CLIP_TEXT_L_PENULTIMATE
from refiners_sd15.clip.text_encoder import CLIPTextEncoderG, CLIPTextEncoderL


class ConcatenateTextEmbeddings(fl.Module):
    """`(penultimate_l, pooled_l), (penultimate_g, pooled_g)` -> `(penultimate_l ‖ penultimate_g, pooled_g)`: the
    hidden states side by side along the last dimension, and the second encoder's pooled embedding."""

    def forward(
        self, outputs_l: tuple[torch.Tensor, torch.Tensor], outputs_g: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat((outputs_l[0], outputs_g[0]), dim=-1), outputs_g[1]


class DoubleTextEncoder(fl.Chain):
    """SDXL's text encoders: a prompt to the text embedding `(1, 77, 2048)` and the pooled text embedding `(1, 1280)`.

    Each encoder tokenizes the prompt (or N prompts) with its own tokenizer (CLIP-L's pads with its end-of-text
    token, CLIP-G's with `!`); the text embedding is CLIP-L's penultimate hidden states (768) followed by CLIP-G's
    (1280), the pooled embedding is CLIP-G's projected one, as diffusers' `StableDiffusionXLPipeline.encode_prompt`
    computes them. Called on a prompt it returns the tuple `(text embedding, pooled text embedding)`.

    Args:
        text_encoder_l: CLIP ViT-L/14 with `output="penultimate_and_pooled"` (its pooled embedding is not used);
            defaults to the published architecture (`CLIP_TEXT_L_PENULTIMATE`) with random weights.
        text_encoder_g: OpenCLIP ViT-bigG/14; defaults to `CLIPTextEncoderG()` with random weights.
        device: device of the default encoders' parameters.
        dtype: dtype of the default encoders' parameters.

    Raises:
        ValueError: if `text_encoder_l` does not return its penultimate hidden states, or the two encoders' tokenizers
            give sequences of different lengths.
    """

    def __init__(
        self,
        text_encoder_l: CLIPTextEncoderL | None = None,
        text_encoder_g: CLIPTextEncoderG | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if text_encoder_l is None:
            text_encoder_l = CLIPTextEncoderL(CLIP_TEXT_L_PENULTIMATE, device=device, dtype=dtype)
        if text_encoder_g is None:
            text_encoder_g = CLIPTextEncoderG(device=device, dtype=dtype)
        if text_encoder_l.config.output != "penultimate_and_pooled":
            raise ValueError(
                "DoubleTextEncoder: text_encoder_l must return its penultimate hidden states (a config with output="
                f"'penultimate_and_pooled', e.g. CLIP_TEXT_L_PENULTIMATE), got output={text_encoder_l.config.output!r}"
            )
        length_l, length_g = text_encoder_l.tokenizer.sequence_length, text_encoder_g.tokenizer.sequence_length
        if length_l != length_g:
            raise ValueError(
                f"DoubleTextEncoder: the tokenizers give sequences of {length_l} (text_encoder_l) and {length_g} "
                "(text_encoder_g) ids: their hidden states cannot be concatenated"
            )
        super().__init__(fl.Parallel(text_encoder_l, text_encoder_g), ConcatenateTextEmbeddings())

    @property
    def text_encoder_l(self) -> CLIPTextEncoderL:
        """The CLIP ViT-L/14 encoder (the first 768 channels of the text embedding)."""
        return self.ensure_find(CLIPTextEncoderL)

    @property
    def text_encoder_g(self) -> CLIPTextEncoderG:
        """The OpenCLIP ViT-bigG/14 encoder (the last 1280 channels, and the pooled embedding)."""
        return self.ensure_find(CLIPTextEncoderG)
