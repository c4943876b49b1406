"""Blocks of SegmentAnything against segment-anything's, on small shapes, and the checkpoint mapping of every size.

Block parity tolerance: 1e-5 relative to the reference's largest output.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.testing import relative_error
from refiners_sam import PUBLISHED_SIZES, ImageEncoder, SegmentAnything
from refiners_sam.image_encoder import RelativePositionAttention, WindowMerge, WindowPartition
from refiners_sam.mapping import detect_config, image_encoder_mapping, official_mapping
from refiners_sam.testing import (
    Attention,
    ImageEncoderViT,
    randomize,
    sam_model_registry,
    window_partition,
    window_unpartition,
)

TOLERANCE = 1e-5


@pytest.mark.parametrize("grid", [(5, 5), (4, 6)])
def test_sam_relative_position_attention_matches_segment_anything(grid: tuple[int, int]) -> None:
    reference = Attention(24, num_heads=3, use_rel_pos=True, input_size=grid)
    randomize(reference, seed=1)
    with torch.no_grad():
        reference.rel_pos_h.mul_(10)  # large enough to matter next to q kᵀ
    ours = RelativePositionAttention(24, num_heads=3, grid_size=grid)
    load_state_dict_checked(ours, {"rel_pos_h": reference.rel_pos_h, "rel_pos_w": reference.rel_pos_w}, source="test")
    x = torch.randn(2, *grid, 24)
    with torch.no_grad():
        expected = reference(x)
        qkv = reference.qkv(x)
        attended = ours(qkv)
        result = reference.proj(attended)
    assert relative_error(result, expected) < TOLERANCE


def test_sam_relative_position_attention_in_chunks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    attention = RelativePositionAttention(16, num_heads=4, grid_size=(6, 6))
    torch.nn.init.normal_(attention.rel_pos_h)
    torch.nn.init.normal_(attention.rel_pos_w)
    qkv = torch.randn(3, 6, 6, 48)
    whole = attention(qkv)
    monkeypatch.setattr("refiners_sam.image_encoder.ATTENTION_BIAS_ELEMENTS", 36 * 36 * 5)
    assert torch.allclose(attention(qkv), whole, atol=1e-6)


def test_sam_relative_position_attention_names_its_layer_on_a_wrong_grid() -> None:
    attention = RelativePositionAttention(16, num_heads=4, grid_size=(6, 6))
    with pytest.raises(ValueError, match=r"attends over a \(6, 6\) grid, got \(5, 6\)"):
        attention(torch.randn(1, 5, 6, 48))


@pytest.mark.parametrize("height, width, size", [(9, 9, 3), (10, 8, 3), (64, 64, 14)])
def test_sam_window_partition_and_merge_match_segment_anything(height: int, width: int, size: int) -> None:
    x = torch.randn(2, height, width, 4)
    windows, padded = window_partition(x, size)
    assert torch.equal(WindowPartition(size)(x), windows)
    assert torch.equal(
        WindowMerge(size, (height, width))(windows), window_unpartition(windows, size, padded, (height, width))
    )


def test_sam_image_encoder_matches_segment_anything_with_padded_windows() -> None:
    reference = ImageEncoderViT(
        img_size=96,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),  # pyright: ignore[reportArgumentType]
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=5,
        out_chans=16,
    )
    randomize(reference, seed=2)
    config = detect_config(
        {f"image_encoder.{key}": value for key, value in reference.state_dict().items()}, source="test"
    )
    assert (config.num_layers, config.num_heads, config.global_attention_indices, config.window_size) == (3, 2, (1,), 5)
    ours = ImageEncoder.from_config(config)
    load_state_dict_checked(ours, reference.state_dict(), source="test", mapping=image_encoder_mapping(config))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert relative_error(ours(x), reference(x)) < TOLERANCE


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_sam_official_mapping_pairs_every_key_of_each_published_size(size: str) -> None:
    with torch.device("meta"):
        reference = sam_model_registry[size](checkpoint=None)
    tensors = reference.state_dict()
    config = detect_config(tensors, source=f"sam_{size}.pth")
    assert config == PUBLISHED_SIZES[size]
    ours = SegmentAnything(config, device="meta").state_dict()
    mapping = official_mapping(config)
    assert set(mapping) == set(tensors)
    assert sorted(mapping.values()) == sorted(ours)
    assert all(tuple(tensors[key].shape) == tuple(ours[mapping[key]].shape) for key in mapping)
