"""The full published SDXL ControlNet architectures: diffusers/controlnet-canny-sdxl-1.0 and its -mid and -small
variants, random weights (zero convolutions included), saved by diffusers' `save_pretrained` in 1 GB shards and read
back through `ControlNet.from_pretrained`. Residuals are compared with diffusers' within
max |ours - reference| <= 1e-4 * max |reference| (float32, batch 1, 16x16 latents and a 128x128 conditioning image).

One ControlNet in memory at a time (the full one is 1.25 B parameters, 5 GB in float32): the reference's residuals
are computed and kept, the reference written and freed, then ours loaded memory-mapped from that folder.
"""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from refiners_controlnet import SDXL_CONTROLNET, ControlNet
from refiners_controlnet.testing import (
    SDXL_CONTROLNET_CONFIG,
    SDXL_CONTROLNET_MID_CONFIG,
    SDXL_CONTROLNET_SMALL_CONFIG,
    reference_controlnet,
)
from refiners_core.testing import assert_relative_close

CONFIGS = {"full": SDXL_CONTROLNET_CONFIG, "mid": SDXL_CONTROLNET_MID_CONFIG, "small": SDXL_CONTROLNET_SMALL_CONFIG}


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_published_sdxl_controlnet_residuals_match_diffusers(name: str, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    timestep = torch.tensor([801.0])
    text = torch.randn(1, 77, 2048, generator=generator)
    pooled = torch.randn(1, 1280, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    condition = torch.rand(1, 3, 128, 128, generator=generator)
    reference: Any = reference_controlnet(CONFIGS[name], seed=5)
    down, middle = reference(
        x,
        timestep,
        encoder_hidden_states=text,
        controlnet_cond=condition,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )
    expected = [*down, middle]
    try:
        reference.save_pretrained(tmp_path / "controlnet", max_shard_size="1GB")
        del reference
        gc.collect()
        controlnet = ControlNet.from_pretrained(tmp_path / "controlnet").eval()
        if name == "full":
            assert controlnet.config == SDXL_CONTROLNET
        controlnet.set_context(
            "diffusion",
            {"timestep": timestep, "clip_text_embedding": text, "pooled_text_embedding": pooled, "time_ids": time_ids},
        )
        controlnet.set_condition(condition)
        controlnet(x)
        assert len(controlnet.residuals) == len(expected)
        for ours, theirs in zip(controlnet.residuals, expected):
            assert theirs.abs().max() > 0
            assert_relative_close(ours, theirs, 1e-4)
        del controlnet
        gc.collect()
    finally:
        shutil.rmtree(tmp_path / "controlnet", ignore_errors=True)
