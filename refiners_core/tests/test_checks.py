"""`refiners_core.checks`: finite numbers and tensors, and weights files recognised by their first bytes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refiners_core.checks import check_finite, check_finite_tensor, check_weights_file, sniff_weights_format


@pytest.mark.parametrize(("value", "expected"), [("7.5", 7.5), (" -0.5 ", -0.5), (3, 3.0), ("1e-300", 1e-300)])
def test_check_finite_returns_finite_numbers_as_floats(value: object, expected: float) -> None:
    assert check_finite("--guidance", value) == expected


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999", float("nan"), "seven", None, [1.0], ""])
def test_check_finite_names_what_is_not_a_finite_number(value: object) -> None:
    with pytest.raises(ValueError, match="^--guidance must be a finite number, got "):
        check_finite("--guidance", value)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.tensor([1.0, float("nan"), float("inf")]), "noise has 1 NaN and 1 infinite values out of 3"),
        (torch.full((2, 2), float("-inf"), dtype=torch.float16), "noise has 0 NaN and 4 infinite values out of 4"),
        (torch.tensor([complex(float("nan"), 0.0)]), "noise has 1 NaN and 0 infinite values out of 1"),
    ],
)
def test_check_finite_tensor_counts_nan_and_infinite_values(tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_finite_tensor("noise", tensor)


def test_check_finite_tensor_accepts_finite_and_integer_tensors() -> None:
    check_finite_tensor("noise", torch.randn(3, 3))
    check_finite_tensor("ids", torch.tensor([1, 2, 3]))


def weights_files(folder: Path) -> None:
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    torch.save({"w": torch.zeros(2)}, folder / "model.pth")
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    (folder / "legacy.pt").write_bytes(legacy.getvalue())
    (folder / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    (folder / "text.safetensors").write_text("{'not': 'weights'}")
    (folder / "empty.safetensors").write_bytes(b"")


def test_weights_files_are_recognised_by_their_first_bytes_whatever_their_name(tmp_path: Path) -> None:
    weights_files(tmp_path)
    kinds = {path.name: sniff_weights_format(path) for path in tmp_path.iterdir()}
    assert kinds == {
        "model.safetensors": "safetensors",
        "model.pth": "torch-zip",
        "legacy.pt": "torch-pickle",
        "pointer.safetensors": "git-lfs-pointer",
        "text.safetensors": "unknown",
        "empty.safetensors": "unknown",
    }
    renamed = tmp_path / "actually-safetensors.pth"
    renamed.write_bytes((tmp_path / "model.safetensors").read_bytes())
    assert check_weights_file("--lora", renamed) == "safetensors"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("pointer.safetensors", ValueError, "is a git-lfs pointer, not the weights it stands for: run `git lfs pull`"),
        ("text.safetensors", ValueError, "neither a safetensors file nor a PyTorch checkpoint"),
        ("empty.safetensors", ValueError, "empty.safetensors is empty"),
        ("missing.safetensors", FileNotFoundError, "no such file: .*missing.safetensors"),
        (".", IsADirectoryError, "is a folder, not a weights file"),
    ],
)
def test_check_weights_file_names_the_argument_and_what_is_wrong(
    tmp_path: Path, name: str, error: type[Exception], message: str
) -> None:
    weights_files(tmp_path)
    with pytest.raises(error, match=f"^--lora x: .*{message}"):
        check_weights_file("--lora x", tmp_path / name)
