"""`refiners generate` with the options other packages register through `refiners_register_generate_options`
(refiners-lora's `--lora`), every package installed together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from refiners_core.cli import main
from refiners_core.plugins import registry
from refiners_sd15 import (
    SD15_AUTOENCODER,
    CLIPTextEncoderConfig,
    CLIPTextEncoderL,
    SD1Autoencoder,
    SD1UNet,
    StableDiffusion_1,
    UNetConfig,
)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(
        unet=SD1UNet(UNetConfig(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=4,
                                cross_attention_dim=32, cross_attention_levels=(True, False))),
        lda=SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        clip_text_encoder=CLIPTextEncoderL(
            CLIPTextEncoderConfig(embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
        ),
    ).save_pretrained(folder)  # fmt: skip
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
