"""SegmentAnything on a tiny checkpoint in the official layout: loading, predictor API, parity with SamPredictor.

The checkpoint is segment-anything's `Sam` with a 2-layer, 32-wide ViT on 128x128 inputs and the published prompt
encoder and mask decoder, random weights, written with `torch.save(state_dict)`: everything runs in a second.
Tolerances: 1e-4 relative on logits and scores (the full-size ViT-B test in test_sam_parity.py uses 1e-3).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_core.plugins import registry, resolve
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError
from refiners_sam import ImageEmbedding, SegmentAnything
from refiners_sam.testing import Sam, SamPredictor, build_tiny_reference

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference() -> Sam:
    return build_tiny_reference(seed=3)


@pytest.fixture(scope="module")
def checkpoint(reference: Sam, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam(checkpoint: Path) -> SegmentAnything:
    return SegmentAnything.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    generator = torch.Generator().manual_seed(7)
    return Image.fromarray((torch.rand(90, 120, 3, generator=generator) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def predictor(reference: Sam, image: Image.Image) -> SamPredictor:
    predictor = SamPredictor(reference)
    predictor.set_image(np.array(image))
    return predictor


def test_sam_from_pretrained_detects_the_tiny_architecture(sam: SegmentAnything) -> None:
    config = sam.config
    assert (config.embedding_dim, config.num_layers, config.num_heads) == (32, 2, 2)
    assert (config.global_attention_indices, config.window_size, config.image_size) == ((1,), 3, 128)


@pytest.mark.parametrize(
    "prompt",
    [
        {"foreground_points": [(30.0, 40.0)], "background_points": [(100.0, 70.0)]},
        {"box_points": [[(10.0, 15.0), (80.0, 60.0)]]},
        {"foreground_points": [(50.0, 30.0)], "box_points": [[(10.0, 15.0), (80.0, 60.0)]]},
    ],
    ids=["points", "box", "points_and_box"],
)
@pytest.mark.parametrize("multimask_output", [True, False])
def test_sam_predict_matches_sam_predictor(
    sam: SegmentAnything,
    predictor: SamPredictor,
    image: Image.Image,
    prompt: dict[str, list[tuple[float, float]] | list[list[tuple[float, float]]]],
    multimask_output: bool,
) -> None:
    foreground = prompt.get("foreground_points", [])
    background = prompt.get("background_points", [])
    points = [*foreground, *background]
    boxes = prompt.get("box_points")
    masks, scores, logits = sam.predict(image, multimask_output=multimask_output, **prompt)  # type: ignore[arg-type]
    expected_masks, expected_scores, expected_logits = predictor.predict(
        point_coords=np.array(points) if points else None,
        point_labels=np.array([1] * len(foreground) + [0] * len(background)) if points else None,
        box=np.array(boxes[0]).reshape(4) if boxes else None,
        multimask_output=multimask_output,
    )
    count = 3 if multimask_output else 1
    assert masks.shape == (1, count, 90, 120) and masks.dtype == torch.bool
    assert scores.shape == (1, count) and logits.shape == (1, count, 32, 32)
    assert_relative_close(logits[0], torch.as_tensor(expected_logits), TOLERANCE)
    assert_relative_close(scores[0], torch.as_tensor(expected_scores), TOLERANCE)
    assert (masks[0].numpy() == expected_masks).mean() > 0.999


def test_sam_predict_with_low_res_mask_matches_sam_predictor(
    sam: SegmentAnything, predictor: SamPredictor, image: Image.Image
) -> None:
    embedding = sam.compute_image_embedding(image)
    _, _, first = sam.predict(embedding, foreground_points=[(60.0, 45.0)])
    previous = first[:, :1]
    _, scores, logits = sam.predict(embedding, foreground_points=[(60.0, 45.0)], low_res_mask=previous)
    _, expected_scores, expected_logits = predictor.predict(
        point_coords=np.array([[60.0, 45.0]]), point_labels=np.array([1]), mask_input=previous[0].numpy()
    )
    assert_relative_close(logits[0], torch.as_tensor(expected_logits), TOLERANCE)
    assert_relative_close(scores[0], torch.as_tensor(expected_scores), TOLERANCE)


def test_sam_predict_reuses_a_precomputed_embedding(sam: SegmentAnything, image: Image.Image) -> None:
    embedding = sam.compute_image_embedding(image)
    assert isinstance(embedding, ImageEmbedding)
    assert embedding.original_size == (90, 120) and embedding.input_size == (96, 128)
    prompt = {"foreground_points": [(20.0, 20.0)], "box_points": [[(5.0, 5.0), (70.0, 50.0)]]}
    from_image = sam.predict(image, **prompt)  # type: ignore[arg-type]
    from_embedding = sam.predict(embedding, **prompt)  # type: ignore[arg-type]
    for ours, again in zip(from_image, from_embedding):
        assert torch.equal(ours, again)


def test_sam_predict_rejects_a_badly_shaped_low_res_mask(sam: SegmentAnything, image: Image.Image) -> None:
    with pytest.raises(ValueError, match=r"low_res_mask must have shape \(1, 1, 32, 32\)"):
        sam.predict(image, foreground_points=[(1.0, 1.0)], low_res_mask=torch.zeros(1, 32, 32))


def test_sam_predict_rejects_a_box_that_is_not_two_points(sam: SegmentAnything, image: Image.Image) -> None:
    with pytest.raises(ValueError, match="a box is two points"):
        sam.predict(image, box_points=[[(1.0, 1.0), (5.0, 5.0), (9.0, 9.0)]])


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float64), ("cpu", torch.bfloat16), ("meta", torch.float16)])
def test_sam_from_pretrained_puts_every_tensor_on_device_with_dtype(
    checkpoint: Path, device: str, dtype: torch.dtype
) -> None:
    sam = SegmentAnything.from_pretrained(checkpoint, device=device, dtype=dtype)
    tensors = [*sam.parameters(), *sam.buffers()]
    assert tensors and all(tensor.device.type == device and tensor.dtype == dtype for tensor in tensors)


def test_sam_from_pretrained_in_float64_matches_float32(
    sam: SegmentAnything, checkpoint: Path, image: Image.Image
) -> None:
    double = SegmentAnything.from_pretrained(checkpoint, dtype=torch.float64)
    _, scores, logits = double.predict(image, foreground_points=[(30.0, 40.0)])
    _, expected_scores, expected_logits = sam.predict(image, foreground_points=[(30.0, 40.0)])
    assert logits.dtype == torch.float64
    assert torch.allclose(logits.float(), expected_logits, rtol=0, atol=1e-4 * expected_logits.abs().max().item())
    assert torch.allclose(scores.float(), expected_scores, rtol=0, atol=1e-4)


def test_sam_from_pretrained_reads_a_folder_holding_one_checkpoint(checkpoint: Path) -> None:
    sam = SegmentAnything.from_pretrained(checkpoint.parent)
    assert sam.config.embedding_dim == 32


def test_sam_from_pretrained_asks_which_file_when_a_folder_holds_several(checkpoint: Path, tmp_path: Path) -> None:
    for name in ("a.pth", "b.safetensors"):
        (tmp_path / name).write_bytes(checkpoint.read_bytes())
    with pytest.raises(WeightsError, match=r"found: a\.pth, b\.safetensors; pass filename="):
        SegmentAnything.from_pretrained(tmp_path)
    assert SegmentAnything.from_pretrained(tmp_path, filename="a.pth").config.num_layers == 2


def test_sam_from_pretrained_downloads_a_hub_file(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append((repo_id, filename))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    sam = SegmentAnything.from_pretrained("acme/sam-tiny", filename="sam_tiny.pth")
    assert calls == [("acme/sam-tiny", "sam_tiny.pth")]
    assert sam.config.image_size == 128


class _RunsCode:
    """A pickle that would create `marker` when unpickled by a `torch.load` without `weights_only`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_sam_from_pretrained_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    with open(path, "wb") as file:
        pickle.dump({"image_encoder.pos_embed": _RunsCode(marker)}, file, protocol=2)
    with pytest.raises(WeightsError, match="sam_vit_b_01ec64.pth"):
        SegmentAnything.from_pretrained(path)
    assert not marker.exists()


def test_sam_from_pretrained_names_the_missing_key_of_another_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"vision_encoder.patch_embed.projection.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"other\.pth: no 'image_encoder\.patch_embed\.proj\.weight'"):
        SegmentAnything.from_pretrained(path)


def test_sam_from_pretrained_names_file_key_and_layer_of_a_wrong_shape(reference: Sam, tmp_path: Path) -> None:
    tensors = dict(reference.state_dict())
    tensors["mask_decoder.iou_token.weight"] = torch.zeros(1, 255)
    path = tmp_path / "bad.pth"
    torch.save(tensors, path)
    with pytest.raises(WeightsError, match=r"bad\.pth: 'mask_decoder\.iou_token\.weight' has shape \(1, 255\)"):
        SegmentAnything.from_pretrained(path)


def test_sam_is_registered_as_a_model_of_the_plugin_registry() -> None:
    spec = registry(reload=True).models["sam"]
    assert resolve(spec.loader) == SegmentAnything.from_pretrained
