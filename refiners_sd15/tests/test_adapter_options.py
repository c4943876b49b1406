from pathlib import Path

import pytest
from PIL import Image

from refiners_sd15 import MAX_IMAGE_SIDE
from refiners_sd15.adapter_options import check_diffusers_source, check_image_header, split_adapter_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("owner/name:edges.png", ("owner/name", "edges.png", 1.0)),
        ("folder:edges.png:0.25", ("folder", "edges.png", 0.25)),
        ("C:\\models\\canny:D:/images/edges.png:2", ("C:\\models\\canny", "D:/images/edges.png", 2.0)),
    ],
)
def test_split_adapter_value_reads_source_image_and_scale(value: str, expected: tuple[str, str, float]) -> None:
    assert split_adapter_value("--x", value, "SOURCE:IMAGE[:SCALE]", "a:b.png") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("only", "--x 'only': expected SOURCE:IMAGE\\[:SCALE\\], e.g. a:b.png"),
        (":b.png", "--x ':b.png': expected"),
        ("a:b.png:1:2", "--x 'a:b.png:1:2': expected"),
        ("a:b.png:big", "--x 'a:b.png:big': the scale must be a finite number, got 'big'"),
        ("a:b.png:inf", "--x 'a:b.png:inf': the scale must be a finite number, got 'inf'"),
    ],
)
def test_split_adapter_value_names_the_option_and_value_at_fault(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_adapter_value("--x", value, "SOURCE:IMAGE[:SCALE]", "a:b.png")


def test_check_image_header_refuses_missing_unreadable_and_oversized_images(tmp_path: Path) -> None:
    check_image_header("--x v", _png(tmp_path / "ok.png", 8))
    with pytest.raises(FileNotFoundError, match="--x v: no image at"):
        check_image_header("--x v", tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="--x v: cannot read the image"):
        check_image_header("--x v", tmp_path / "text.png")
    with pytest.raises(ValueError, match=f"--x v: the image .* each side must be at most {MAX_IMAGE_SIDE}"):
        check_image_header("--x v", _png(tmp_path / "wide.png", MAX_IMAGE_SIDE + 1, height=1))


def test_check_diffusers_source_refuses_folders_without_config_or_weights_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--x v: .* has no config.json"):
        check_diffusers_source("--x v", str(tmp_path), "diffusion_pytorch_model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--x v: .* has no diffusion_pytorch_model.safetensors"):
        check_diffusers_source("--x v", str(tmp_path), "diffusion_pytorch_model")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--x v: "):
        check_diffusers_source("--x v", str(tmp_path), "diffusion_pytorch_model")
    with pytest.raises(FileNotFoundError, match="--x v: no/such/thing is neither a local file or folder nor a hub id"):
        check_diffusers_source("--x v", "no/such/thing", "diffusion_pytorch_model")


def _png(path: Path, width: int, height: int | None = None) -> Path:
    Image.new("RGB", (width, height or width)).save(path)
    return path
