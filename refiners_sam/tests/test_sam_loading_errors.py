"""A Segment Anything checkpoint whose shapes cannot give a model is refused naming the file and the key that the
size was to be read from, whatever is wrong with it: missing, of the wrong rank, empty, inconsistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refiners_core.weights import WeightsError, save_tensors
from refiners_sam import SegmentAnything
from refiners_sam.mapping import detect_config

SHAPES = {
    "image_encoder.patch_embed.proj.weight": (32, 3, 16, 16),
    "image_encoder.pos_embed": (1, 8, 8, 32),
    "image_encoder.blocks.0.attn.rel_pos_h": (5, 16),
    "image_encoder.blocks.1.attn.rel_pos_h": (15, 16),
    "image_encoder.neck.0.weight": (256, 32, 1, 1),
}


def tensors(change: dict[str, tuple[int, ...] | None] | None = None) -> dict[str, torch.Tensor]:
    shapes = {**SHAPES, **(change or {})}
    return {key: torch.zeros(shape) for key, shape in shapes.items() if shape is not None}


def test_the_shapes_give_the_config() -> None:
    config = detect_config(tensors(), source="sam.pth")
    assert (config.embedding_dim, config.num_layers, config.num_heads) == (32, 2, 2)
    assert (config.global_attention_indices, config.window_size, config.image_size) == ((1,), 3, 128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"image_encoder.patch_embed.proj.weight": (32, 3, 16)},
            "'image_encoder.patch_embed.proj.weight' has shape",
        ),
        ({"image_encoder.patch_embed.proj.weight": None}, "no 'image_encoder.patch_embed.proj.weight'"),
        ({"image_encoder.pos_embed": (8, 8)}, "'image_encoder.pos_embed' has shape (8, 8), expected 4"),
        ({"image_encoder.pos_embed": (1, 0, 8, 32)}, "'image_encoder.pos_embed' has shape (1, 0, 8, 32)"),
        ({"image_encoder.blocks.1.attn.rel_pos_h": (15,)}, "'image_encoder.blocks.1.attn.rel_pos_h' has shape"),
        ({"image_encoder.blocks.7.attn.rel_pos_h": (5, 16)}, "no 'image_encoder.blocks.2.attn.rel_pos_h'"),
        ({"image_encoder.blocks.1.attn.rel_pos_h": (15, 12)}, "head sizes [12, 16]"),
        (
            {"image_encoder.blocks.0.attn.rel_pos_h": (5, 7), "image_encoder.blocks.1.attn.rel_pos_h": (15, 7)},
            "divides the width 32",
        ),
        ({"image_encoder.neck.0.weight": (256,)}, "'image_encoder.neck.0.weight' has shape (256,)"),
    ],
)
def test_a_bad_checkpoint_shape_is_refused_naming_the_file_and_key(
    change: dict[str, tuple[int, ...] | None], message: str
) -> None:
    with pytest.raises(WeightsError) as error:
        detect_config(tensors(change), source="sam.pth")
    assert str(error.value).startswith("sam.pth: ")
    assert message in str(error.value)


def test_no_blocks_is_refused_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "sam.safetensors"
    save_tensors(path, {key: value for key, value in tensors().items() if ".blocks." not in key})
    with pytest.raises(WeightsError, match=r"no 'image_encoder\.blocks\.N\.\*' keys, from which the depth is read"):
        SegmentAnything.from_pretrained(path)


def test_from_pretrained_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sam.safetensors"
    save_tensors(path, tensors({"image_encoder.pos_embed": (64, 32)}))
    with pytest.raises(WeightsError) as error:
        SegmentAnything.from_pretrained(path)
    assert str(error.value).startswith(f"{path}: 'image_encoder.pos_embed' has shape (64, 32)")
