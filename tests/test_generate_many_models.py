"""`refiners generate` for many images with other packages' models and options: an SDXL batch (refiners-sdxl), and a
prompts file whose items use refiners-lora's `--lora` through `loras`; scaled-down models with random weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_core import fluxion as fl
from refiners_core.cli import main
from refiners_lora.manager import LoraManager
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.generate_outputs import recorded_settings
from refiners_sd15.testing import small_sd15_components
from refiners_sdxl.testing import write_small_sdxl_folder

SMALL = ("--steps", "2", "--solver", "ddim", "--size", "32x32", "--no-progress")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_an_sdxl_image_of_a_batch_equals_the_same_seed_generated_alone(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    folder = write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl"))
    arguments = ["generate", "a cat", "--model", str(folder), *SMALL]

    assert main([*arguments, "--seed", "1", "--num-images", "3", "--batch-size", "3", "--out-dir", str(tmp_path)]) == 0
    assert main([*arguments, "--seed", "3", "--out", str(tmp_path / "alone.png")]) == 0

    first, last = pixels(tmp_path / "00000.png"), pixels(tmp_path / "00002.png")
    assert np.abs(first - last).max() > 10  # the seeds give different images: the comparison below means something
    # tolerance: one 8-bit level, float rounding of a batch of 3 against a batch of 1 (the same fp32 model)
    assert np.abs(last - pixels(tmp_path / "alone.png")).max() <= 1
    settings = recorded_settings(tmp_path / "00002.png")
    assert settings is not None and (settings["model_type"], settings["seed"]) == ("sdxl", 3)


@pytest.fixture(scope="module")
def sd15_with_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small SD1.5 folder, and a LoRA file for its UNet's linear layers with random, non-zero weights."""
    folder = tmp_path_factory.mktemp("sd15")
    sd = StableDiffusion_1(**small_sd15_components(4))  # pyright: ignore[reportArgumentType]
    sd.save_pretrained(folder)
    layers = [name for name, module in sd.named_modules() if isinstance(module, fl.Linear) and "unet" in name]
    manager = LoraManager(sd)
    torch.manual_seed(0)
    for adapter in manager.create("style", layers, rank=2).values():
        up = adapter.lora.up
        assert isinstance(up, fl.Linear)
        torch.nn.init.normal_(up.weight, std=0.5)
    lora = folder.parent / "style.safetensors"
    manager.save("style", lora)
    return folder, lora


def test_prompts_file_items_with_loras_equal_the_lora_option_and_a_missing_lora_fails_alone(
    sd15_with_lora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, lora = sd15_with_lora
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a cat", "id": "plain", "seed": 2},
        {"prompt": "a cat", "id": "styled", "seed": 2, "loras": [{"file": str(lora), "scale": 0.8}]},
        {"prompt": "a cat", "id": "missing", "loras": [{"file": str(tmp_path / "missing.safetensors")}]},
        {"prompt": "a cat", "id": "also-plain", "seed": 2},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"

    code = main(["generate", "--model", str(folder), *SMALL, "--prompts", str(prompts), "--out-dir", str(out)])
    single = ["generate", "a cat", "--model", str(folder), *SMALL, "--seed", "2"]
    assert main([*single, "--lora", f"{lora}:0.8", "--out", str(tmp_path / "single.png")]) == 0

    captured = capsys.readouterr()
    assert code == 1
    assert "3 written, 0 skipped (already complete), 1 failed" in captured.out
    assert f"failed: missing: {prompts}:3: --lora" in captured.err
    assert sorted(path.name for path in out.iterdir()) == ["also-plain.png", "plain.png", "styled.png"]
    assert np.abs(pixels(out / "plain.png") - pixels(out / "styled.png")).max() > 10  # the LoRA changes the image
    assert np.array_equal(pixels(out / "styled.png"), pixels(tmp_path / "single.png"))
    assert np.array_equal(pixels(out / "plain.png"), pixels(out / "also-plain.png"))  # the LoRA left the model
    settings = recorded_settings(out / "styled.png")
    assert settings is not None
    sha256 = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert settings["options"] == {"--lora": [{"value": f"{lora}:0.8", "sha256": sha256}]}
