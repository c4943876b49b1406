"""`refiners generate` with the options other packages register through `refiners_register_generate_options`
(refiners-lora's `--lora`), every package installed together."""

from __future__ import annotations

from pathlib import Path

import pytest

from refiners_core.cli import main
from refiners_core.plugins import registry
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import small_sd15_components


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


def test_lora_option_is_registered_for_sd15_by_refiners_lora() -> None:
    loaded = registry(reload=True)
    assert loaded.generate_options["--lora"].applies_to("sd15")
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-lora"]
    assert "--lora" in record.generate_options


def test_generate_with_a_missing_lora_file_exits_with_an_error_naming_it(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, out = tmp_path / "missing.safetensors", tmp_path / "out.png"

    code = main(["generate", "a cat", "--model", str(model_folder), "--lora", f"{missing}:0.5", "--out", str(out)])

    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("refiners generate: error: --lora ")
    assert str(missing) in error
    assert not out.exists()
