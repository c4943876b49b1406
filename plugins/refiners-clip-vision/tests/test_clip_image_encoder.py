"""`CLIPImageEncoder` against transformers' `CLIPVisionModelWithProjection` (random weights, small configs, float32):
projected image embeddings and penultimate hidden states within max |ours - reference| <= 1e-4 * max |reference|;
loading transformers folders, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from refiners_clip_vision import CLIPImageEncoder, CLIPImageEncoderConfig, clip_image_config_from_transformers
from refiners_clip_vision.testing import SMALL_VIT_BIGG, SMALL_VIT_H, reference_encoder, write_reference_folder
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError

TOLERANCE = 1e-4


@pytest.mark.parametrize("config", [SMALL_VIT_H, SMALL_VIT_BIGG], ids=["vit-h-like", "vit-bigg-like"])
def test_image_embeds_and_penultimate_hidden_states_match_transformers(
    config: CLIPImageEncoderConfig, tmp_path: Path
) -> None:
    write_reference_folder(tmp_path, config, seed=3)
    reference = reference_encoder(config, seed=3)
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        image_embeds, penultimate = CLIPImageEncoder.from_pretrained(str(tmp_path))(pixels)
    assert_relative_close(image_embeds, expected.image_embeds, TOLERANCE)
    assert_relative_close(penultimate, expected.hidden_states[-2], TOLERANCE)
    # the two images differ: a per-batch mix-up would show
    assert (expected.image_embeds[0] - expected.image_embeds[1]).abs().max() > 1e-2


def test_a_pytorch_model_bin_is_read_through_the_safe_loader(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_H, seed=1)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    encoder = CLIPImageEncoder.from_pretrained(str(tmp_path))
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert_relative_close(
            encoder(pixels)[0], reference_encoder(SMALL_VIT_H, seed=1)(pixel_values=pixels).image_embeds, TOLERANCE
        )


def test_config_is_read_from_a_transformers_config_json(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_BIGG)
    values = json.loads((tmp_path / "config.json").read_text())
    assert clip_image_config_from_transformers(values) == SMALL_VIT_BIGG


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "clip"}, "'model_type' is 'clip'"),
        ({"architectures": ["CLIPVisionModel"]}, "'architectures'"),
        ({"hidden_act": "relu"}, "'hidden_act' is 'relu'"),
        ({"num_attention_heads": 3}, "num_attention_heads=3 does not divide embedding_dim=32"),
        ({"hidden_size": -1}, "embedding_dim must be a positive integer, got -1"),
    ],
)
def test_a_bad_config_is_refused_naming_the_file_and_field(tmp_path: Path, change: dict[str, object], message: str):
    write_reference_folder(tmp_path, SMALL_VIT_H)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(values | change))
    with pytest.raises(WeightsError, match="config.json: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        CLIPImageEncoder.from_pretrained(str(tmp_path))


def test_weights_of_another_shape_are_refused_naming_the_key(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_H)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["visual_projection.weight"] = torch.zeros(8, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"'visual_projection.weight' has shape \(8, 32\)"):
        CLIPImageEncoder.from_pretrained(str(tmp_path))


def test_a_folder_without_weights_is_refused_naming_it(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_H)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin in"):
        CLIPImageEncoder.from_pretrained(str(tmp_path))


def test_images_of_another_size_are_refused() -> None:
    encoder = CLIPImageEncoder(SMALL_VIT_H)
    with pytest.raises(ValueError, match="give images of the encoder's image_size"):
        encoder(torch.randn(1, 3, 70, 70))


def test_published_configs_have_the_published_sizes() -> None:
    from refiners_clip_vision import CLIP_VIT_BIGG_14, CLIP_VIT_H_14

    def count(config: CLIPImageEncoderConfig) -> int:
        return sum(p.numel() for p in CLIPImageEncoder(config, device="meta").parameters())

    assert round(count(CLIP_VIT_H_14) / 1e6) == 632
    assert round(count(CLIP_VIT_BIGG_14) / 1e6) == 1845
