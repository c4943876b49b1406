"""Full-size parity: our ViT-B SegmentAnything against segment-anything's SamPredictor, same random weights.

The reference is `sam_model_registry["vit_b"](checkpoint=None)` with every weight drawn at random, written with
`torch.save(state_dict)` as the official checkpoints are, and read back by `SegmentAnything.from_pretrained`. On a
non-square 640x480 image: low-resolution logits within 1e-3 of the reference's largest logit, IoU scores within
1e-3, and full-size masks equal on more than 99.9 % of the pixels. The image is encoded once per side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_core.testing import relative_error
from refiners_sam import VIT_B, ImageEmbedding, SegmentAnything
from refiners_sam.testing import SamPredictor, build_reference

TOLERANCE = 1e-3
FOREGROUND = (320.0, 200.0)
BACKGROUND = (90.0, 410.0)
BOX = ((120.0, 80.0), (500.0, 380.0))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(480, 640, 3, generator=generator)
    ramp = torch.linspace(0, 1, 640)[None, :, None]
    return Image.fromarray(((0.5 * noise + 0.5 * ramp) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, image: Image.Image) -> tuple[SegmentAnything, SamPredictor]:
    reference = build_reference("vit_b", seed=0)
    path = tmp_path_factory.mktemp("sam_vit_b") / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)
    sam = SegmentAnything.from_pretrained(path)
    predictor = SamPredictor(reference)
    predictor.set_image(np.array(image))
    return sam, predictor


@pytest.fixture(scope="module")
def embedding(models: tuple[SegmentAnything, SamPredictor], image: Image.Image) -> ImageEmbedding:
    return models[0].compute_image_embedding(image)


def test_sam_vit_b_is_detected_from_the_checkpoint(models: tuple[SegmentAnything, SamPredictor]) -> None:
    assert models[0].config == VIT_B


def test_sam_vit_b_image_embedding_matches_segment_anything(
    models: tuple[SegmentAnything, SamPredictor], embedding: ImageEmbedding
) -> None:
    assert embedding.features.shape == (1, 256, 64, 64)
    assert embedding.input_size == (768, 1024)
    expected = models[1].features
    assert expected is not None
    assert relative_error(embedding.features, expected) < TOLERANCE


def test_sam_vit_b_point_prompt_multimask_matches_sam_predictor(
    models: tuple[SegmentAnything, SamPredictor], embedding: ImageEmbedding
) -> None:
    sam, predictor = models
    masks, scores, logits = sam.predict(embedding, foreground_points=[FOREGROUND], background_points=[BACKGROUND])
    expected_masks, expected_scores, expected_logits = predictor.predict(
        point_coords=np.array([FOREGROUND, BACKGROUND]), point_labels=np.array([1, 0]), multimask_output=True
    )
    assert masks.shape == (1, 3, 480, 640)
    assert relative_error(logits[0], torch.as_tensor(expected_logits)) < TOLERANCE
    assert np.abs(scores[0].numpy() - expected_scores).max() < TOLERANCE
    assert (masks[0].numpy() == expected_masks).mean() > 0.999


def test_sam_vit_b_box_prompt_single_mask_matches_sam_predictor(
    models: tuple[SegmentAnything, SamPredictor], embedding: ImageEmbedding
) -> None:
    sam, predictor = models
    masks, scores, logits = sam.predict(embedding, box_points=[list(BOX)], multimask_output=False)
    expected_masks, expected_scores, expected_logits = predictor.predict(
        box=np.array(BOX).reshape(4), multimask_output=False
    )
    assert masks.shape == (1, 1, 480, 640)
    assert relative_error(logits[0], torch.as_tensor(expected_logits)) < TOLERANCE
    assert np.abs(scores[0].numpy() - expected_scores).max() < TOLERANCE
    assert (masks[0].numpy() == expected_masks).mean() > 0.999
    assert 0.0 < expected_masks.mean() < 1.0  # a mask with both sides, so the comparison means something
