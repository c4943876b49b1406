"""`torch.compile` captures the whole SD1UNet in one graph (no graph break) and reuses it from step to step.

`fullgraph=True` makes any graph break an error; the `eager` backend runs the captured graph op by op, so the
compiled output equals the eager one exactly (checked within 1e-6 of max |eager|) and the test stays fast. A small
configuration of the same class goes through the same code paths as SD1.5 (cross-attention and plain levels,
skip connections, upsampling to the skip's size); the published SD1.5 config, checked by hand with
`torch._dynamo.explain(SD1UNet())(x)` at 16x16 latents, also gives one graph and 0 graph breaks.

The timestep and the text embedding reach the layers through the Context API: they must be graph inputs, not
constants baked in, so a denoising loop that sets new ones at every step runs the same graph without recompiling.
"""

from __future__ import annotations

import pytest
import torch

from refiners_core.testing import assert_relative_close
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import small_compile_unet

TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # refiners_core.testing's fixture


def set_step(unet: SD1UNet, timestep: int, seed: int) -> None:
    unet.set_timestep(torch.tensor([timestep]))
    unet.set_clip_text_embedding(torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(seed)))


def test_sd15_unet_compiles_without_graph_break_and_new_steps_reuse_the_graph() -> None:
    unet = small_compile_unet()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")  # raises on a graph break
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        set_step(unet, timestep=999, seed=1)
        first = compiled(x)
        assert_relative_close(first, unet(x), TOLERANCE)
        assert not unet.use_context("unet"), "the skip connections must not outlive the call"
        set_step(unet, timestep=500, seed=2)
        with torch.compiler.set_stance("fail_on_recompile"):
            second = compiled(x)
        expected = unet(x)
    assert_relative_close(second, expected, TOLERANCE)
    assert not torch.allclose(second, first), "the new timestep and text embedding must reach the compiled graph"
