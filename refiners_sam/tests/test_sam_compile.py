"""`torch.compile` captures the whole SAM image encoder in one graph (no graph break).

`fullgraph=True` makes any graph break an error; the `eager` backend runs the captured graph op by op, so the
compiled output equals the eager one (checked within 1e-6 of max |eager|) and the test stays fast. The small
configuration has windowed blocks over a grid that needs padding and a global block, the code paths of the
published sizes; ViT-B as published, checked by hand with `torch._dynamo.explain(ImageEncoder())(x)` on a
1024x1024 image, also gives one graph and 0 graph breaks.
"""

from __future__ import annotations

import pytest
import torch

from refiners_sam import ImageEncoder

TOLERANCE = 1e-6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # refiners_core.testing's fixture


def test_sam_image_encoder_compiles_without_graph_break() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(
        embedding_dim=32,
        num_layers=2,
        num_heads=2,
        global_attention_indices=(1,),
        window_size=5,
        image_size=96,
        patch_size=8,
        output_dim=16,
    ).eval()
    compiled = torch.compile(encoder, fullgraph=True, backend="eager")  # raises on a graph break
    first, second = torch.randn(2, 1, 3, 96, 96)
    with torch.no_grad():
        compiled(first)
        with torch.compiler.set_stance("fail_on_recompile"):  # another image of the same size: the same graph
            output = compiled(second)
        expected = encoder(second)
    assert output.shape == (1, 16, 12, 12)
    assert (output - expected).abs().max() <= TOLERANCE * expected.abs().max()
