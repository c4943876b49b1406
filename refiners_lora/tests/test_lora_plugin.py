"""The `--lora FILE[:SCALE]` generate option: parsing, loading through `LoraManager`, errors, registration; the
`refiners lora` command's registration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.plugins import registry, resolve
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager, inspect_command
from refiners_lora.options import apply_lora_option, parse_lora_option


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


def test_the_lora_option_is_registered_for_sd15_and_sdxl() -> None:
    spec = registry(reload=True).generate_options["--lora"]
    assert (
        resolve(spec.apply) is apply_lora_option and spec.metavar == "FILE[:SCALE]" and spec.models == ("sd15", "sdxl")
    )


def test_the_lora_command_is_registered_by_reference_to_the_inspect_command() -> None:
    spec = registry(reload=True).commands["lora"]
    assert resolve(spec.run) is inspect_command.run and resolve(spec.configure) is inspect_command.configure
    assert "Inspect LoRA files" in spec.help


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("{good}:nan", ValueError, "the scale must be a finite number, got 'nan'"),
        ("{good}:inf", ValueError, "the scale must be a finite number, got 'inf'"),
        ("{good}:-1e999", ValueError, "the scale must be a finite number"),
        ("{good}:strong", ValueError, "'strong' is not a scale"),
        ("{folder}/missing.safetensors:0.5", FileNotFoundError, "no such file: .*missing.safetensors"),
        ("{folder}", IsADirectoryError, "is a folder, not a weights file"),
        ("{folder}/empty.safetensors", ValueError, "empty.safetensors is empty"),
        ("{folder}/notes.safetensors", ValueError, "neither a safetensors file nor a PyTorch checkpoint"),
        ("{folder}/pointer.safetensors", ValueError, "git-lfs pointer, not the weights it stands for"),
        ("{folder}/model.safetensors", ValueError, "not a LoRA file: no key ends in lora_down/lora_up"),
        ("{folder}/truncated.safetensors:2", ValueError, "truncated.safetensors"),
    ],
)
def test_lora_option_values_are_validated_before_the_model_is_loaded(
    tmp_path: Path, value: str, error: type[Exception], message: str
) -> None:
    good = lora_file(tmp_path / "good.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "notes.safetensors").write_text("my favourite LoRAs")
    (tmp_path / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    save_file({"Linear_1.weight": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-8])
    validate = registry().generate_options["--lora"].validate
    assert validate is not None
    value = value.format(good=good, folder=tmp_path)
    with pytest.raises(error, match=f"--lora '?{re.escape(value)}'?: .*{message}"):
        validate([f"{good}:0.5", value])
    validate([str(good), f"{good}:-0.5"])
