"""`refiners generate` with an SDXL model and the adapter options other packages register (`--embedding`,
`--controlnet`, `--freeu`), every package installed together: each is declared for `sd15` only until the adapters
support SDXL, so each is refused, naming the option and the model kind, before anything is read or loaded. (`--lora`
supports SDXL: tests/test_lora_sdxl.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from refiners_core.cli import main
from refiners_core.plugins import registry
from refiners_sdxl.testing import write_small_sdxl_folder

ADAPTER_OPTIONS = {
    "--embedding": "cat-toy.safetensors",
    "--controlnet": "canny:edges.png",
    "--freeu": "1.1,1.2,0.9,0.2",
}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def test_every_adapter_option_is_installed_and_declared_for_sd15_only() -> None:
    options = registry(reload=True).generate_options
    for flag in ADAPTER_OPTIONS:
        assert options[flag].applies_to("sd15") and not options[flag].applies_to("sdxl"), flag


@pytest.mark.parametrize("flag", sorted(ADAPTER_OPTIONS))
def test_an_adapter_option_with_an_sdxl_model_is_refused_naming_the_option_and_the_kind(
    flag: str, sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"

    code = main(["generate", "a cat", "--model", str(sdxl_folder), flag, ADAPTER_OPTIONS[flag], "--out", str(out)])

    assert code == 2
    assert capsys.readouterr().err == (
        f"refiners generate: error: {flag} is not supported with an sdxl model yet (only with sd15)\n"
    )
    assert not out.exists()
