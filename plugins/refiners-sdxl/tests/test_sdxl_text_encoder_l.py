"""SDXL's first text encoder: the full published CLIP ViT-L/14 (`text_encoder/` of
stabilityai/stable-diffusion-xl-base-1.0) read for its penultimate hidden states, against transformers'
`CLIPTextModel(..., output_hidden_states=True)`.

Random weights (every parameter perturbed), written with `save_pretrained` and loaded through refiners-sd15's
`SDXL_TEXT_ENCODER_FORMAT`, as `StableDiffusion_XL.from_pretrained` loads it; within 1e-4 of max |reference|. (The full
OpenCLIP ViT-bigG with its projection is checked in refiners-sd15's tests.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from refiners_core.testing import assert_relative_close
from refiners_sd15.clip import CLIP_TEXT_L_PENULTIMATE, SDXL_TEXT_ENCODER_FORMAT, CLIPTextEncoderL
from refiners_sd15.loading import load_component
from refiners_sdxl.testing import SDXL_TEXT_ENCODER_CONFIG

TOLERANCE = 1e-4


@torch.no_grad()
def test_full_clip_l_penultimate_hidden_states_match_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {
        key: value for key, value in SDXL_TEXT_ENCODER_CONFIG.items() if key not in ("architectures", "model_type")
    }
    reference = CLIPTextModel(CLIPTextConfig(**config)).eval()
    for parameter in reference.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.02)
    reference.save_pretrained(tmp_path / "text_encoder")
    token_ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(1))
    token_ids[:, 0], token_ids[:, 20:] = 49406, 49407  # start, then end-of-text padding as CLIP-L's tokenizer pads
    expected = reference(token_ids, output_hidden_states=True)
    del reference

    encoder = load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, tmp_path).eval()
    assert encoder.config == CLIP_TEXT_L_PENULTIMATE
    penultimate, pooled = encoder(token_ids)

    assert_relative_close(penultimate, expected.hidden_states[-2], TOLERANCE)
    assert_relative_close(pooled, expected.pooler_output, TOLERANCE)
    assert not torch.allclose(expected.hidden_states[-2], expected.last_hidden_state, atol=1e-2)
