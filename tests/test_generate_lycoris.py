"""`refiners generate --lora FILE:SCALE` with a kohya LyCORIS file (a LoHa, a DoRA LoCon written by the
`lycoris-lora` package's own modules) on a small SD1.5 folder with random weights: the image differs from the one
without the file, and is the image the Python API makes with the same file and scale (`LoraManager.add`, then
`generate_sd15` with the command's solver and settings), within one 8-bit level."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from torch import nn

from refiners_core.cli import main
from refiners_lora import LoraManager
from refiners_lora.delta_adapter import DeltaAdapter
from refiners_lora.testing import apply_lycoris
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.cli import make_solver
from refiners_sd15.generation import generate_sd15
from refiners_sd15.testing import DiffusersReferences, kohya_module_name

PROMPT = "a photograph of an astronaut riding a horse"
SETTINGS = {"--steps": "1", "--size": "32x32", "--seed": "0", "--guidance": "7.5", "--solver": "dpm"}


def loha(index: int, name: str, layer: nn.Linear | nn.Conv2d) -> Any:
    from lycoris.modules import LohaModule  # lycoris-lora: a test extra of refiners-lora

    return LohaModule(name, layer, lora_dim=2, alpha=1)


def dora(index: int, name: str, layer: nn.Linear | nn.Conv2d) -> Any:
    from lycoris.modules import LoConModule

    return LoConModule(name, layer, lora_dim=2, alpha=1, weight_decompose=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_small"))


def generate(references: DiffusersReferences, out: Path, *options: str) -> Image.Image:
    settings = [item for pair in SETTINGS.items() for item in pair]
    arguments = ["generate", PROMPT, "--model", str(references.folder), *settings, "--no-progress"]
    assert main([*arguments, "--out", str(out), *options]) == 0
    return Image.open(out).convert("RGB")


@pytest.mark.parametrize(("family", "module"), [("LoHa", loha), ("DoRA", dora)])
def test_refiners_generate_applies_a_lycoris_file_as_the_python_api_does(
    family: str, module: Any, references: DiffusersReferences, tmp_path: Path
) -> None:
    path = tmp_path / f"{family}.safetensors"
    models = {"unet": copy.deepcopy(references.unet), "text_encoder": copy.deepcopy(references.text_encoder)}
    apply_lycoris(models, kohya_module_name, path, module=module)
    plain = generate(references, tmp_path / "plain.png")
    styled = generate(references, tmp_path / "styled.png", "--lora", f"{path}:0.7")
    assert np.abs(np.asarray(styled, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() > 8

    sd = StableDiffusion_1.from_pretrained(references.folder)
    LoraManager(sd).add("style", path, scale=0.7)
    adapters = [layer for layer in sd.modules() if isinstance(layer, DeltaAdapter)]
    assert adapters and all(family in layer.delta.recognized.description for layer in adapters)
    if family == "DoRA":
        assert any(layer.low_rank for layer in adapters)  # the low-rank path is the one the command runs
    expected = generate_sd15(
        sd,
        prompt=PROMPT,
        negative_prompt="",
        make_solver=functools.partial(make_solver, "dpm", 1, seed=0),
        size=(32, 32),
        guidance=7.5,
        seed=0,
        init_image=None,
        after_step=lambda step, x: None,
    )
    difference = np.abs(np.asarray(styled, dtype=np.int16) - np.asarray(expected.convert("RGB"), dtype=np.int16))
    assert difference.max() <= 1
