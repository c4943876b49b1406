"""The `--lora FILE[:SCALE]` generate option: parsing, loading through `LoraManager`, errors, registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.plugins import registry
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.plugin import apply_lora_option, parse_lora_option


def chain() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(fl.Linear(4, 4), fl.Linear(4, 2))


def lora_file(path: Path, layer: str = "Linear_1") -> Path:
    outputs = 4 if layer == "Linear_1" else 2
    save_file({f"{layer}.down.weight": torch.randn(1, 4), f"{layer}.up.weight": torch.randn(outputs, 1)}, path)
    return path


@pytest.mark.parametrize(
    ("value", "path", "scale"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.5", "style.safetensors", 0.5),
        ("loras/style.safetensors:-1e-1", "loras/style.safetensors", -0.1),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
        ("C:\\loras\\style.safetensors:2", "C:\\loras\\style.safetensors", 2.0),
    ],
)
def test_lora_option_values_parse_into_path_and_scale(value: str, path: str, scale: float) -> None:
    assert parse_lora_option(value) == (Path(path), scale)


def test_a_scale_that_is_not_a_number_is_named() -> None:
    with pytest.raises(ValueError, match=r"'style.safetensors:strong'.*'strong' is not a scale"):
        parse_lora_option("style.safetensors:strong")


def test_apply_loads_each_file_named_after_its_stem_with_its_scale(tmp_path: Path) -> None:
    model = chain()
    first = lora_file(tmp_path / "style.safetensors")
    (tmp_path / "other").mkdir()
    second = lora_file(tmp_path / "other" / "style.safetensors", "Linear_2")
    apply_lora_option(model, [f"{first}:0.5", str(second)])
    loras = LoraManager(model)
    assert loras.names == ("style", "style-2")
    assert loras.scale("style") == 0.5 and loras.scale("style-2") == 1.0
    assert isinstance(model["Linear_1"], LoraAdapter) and isinstance(model["Linear_2"], LoraAdapter)


def test_a_missing_file_is_named_before_anything_loads(tmp_path: Path) -> None:
    model = chain()
    present = lora_file(tmp_path / "style.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        apply_lora_option(model, [str(present), str(tmp_path / "missing.safetensors:0.8")])
    assert LoraManager(model).names == ()


def test_a_bad_file_undoes_the_loras_loaded_before_it(tmp_path: Path) -> None:
    model = chain()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    good = lora_file(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not weights")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        apply_lora_option(model, [str(good), str(bad)])
    assert LoraManager(model).names == ()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_the_lora_option_is_registered_for_every_model() -> None:
    spec = registry(reload=True).generate_options["--lora"]
    assert spec.apply is apply_lora_option and spec.metavar == "FILE[:SCALE]" and spec.models is None
