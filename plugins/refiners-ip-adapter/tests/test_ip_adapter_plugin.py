"""refiners-ip-adapter as a plugin: found through its entry point, its `ip-adapter` adapter and its `--ip-adapter
WEIGHTS:IMAGE[:SCALE]` and `--ip-adapter-encoder FOLDER` options, run by `refiners generate` on a small random SD1.5
folder; bad values are refused naming them, before the model loads or leaving it unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from refiners_clip_vision.testing import SMALL_VIT_BIGG, SMALL_VIT_H, write_reference_folder
from refiners_core.cli import main
from refiners_core.plugins import registry
from refiners_core.testing.plugins import discovered_plugin, listed_plugin
from refiners_core.weights import save_tensors
from refiners_ip_adapter import ImageCrossAttention, IPAdapter, text_cross_attentions
from refiners_ip_adapter.cli import IPAdapterOption, parse_ip_adapter_option
from refiners_ip_adapter.testing import released_weights, write_release_folder
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.generate_checks import GenerateError
from refiners_sd15.testing import small_sd15_components


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A small SD1.5 folder, an IP-Adapter release for it (weights and image_encoder/), a reference image."""
    root = tmp_path_factory.mktemp("ip")
    sd = StableDiffusion_1(**small_sd15_components(4))  # pyright: ignore[reportArgumentType]
    sd.save_pretrained(root / "sd15")
    attentions = text_cross_attentions(sd.unet)
    tensors = released_weights(
        "linear", image_embedding_dim=24, cross_attention_dim=32, inner_dims=[a.inner_dim for a in attentions]
    )
    weights = write_release_folder(root / "release" / "models", "ip-adapter.safetensors", tensors, SMALL_VIT_H)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "reference.png")
    return SimpleNamespace(root=root, model=root / "sd15", weights=weights, image=root / "reference.png")


def test_refiners_ip_adapter_is_discovered_through_its_entry_point() -> None:
    discovered_plugin("refiners-ip-adapter", "ip_adapter = refiners_ip_adapter.plugin")
    assert registry().generate_options["--ip-adapter"].applies_to("sd15")
    record = listed_plugin("refiners-ip-adapter")
    assert record["adapters"] == ["ip-adapter"]
    assert record["generate_options"] == ["--ip-adapter-encoder", "--ip-adapter"]


def test_the_registered_adapter_builds_an_ip_adapter(files: SimpleNamespace) -> None:
    unet = StableDiffusion_1.from_pretrained(files.model).unet
    adapter = registry().adapters["ip-adapter"].create(unet, weights=files.weights, scale=0.5)
    assert isinstance(adapter, IPAdapter) and adapter.scale == 0.5 and not adapter.is_injected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("ip.bin:ref.png", IPAdapterOption(Path("ip.bin"), Path("ref.png"), 1.0)),
        ("a/ip.safetensors:b/ref.png:0.6", IPAdapterOption(Path("a/ip.safetensors"), Path("b/ref.png"), 0.6)),
        ("C:\\m\\ip.bin:D:\\ref.png:2", IPAdapterOption(Path("C:\\m\\ip.bin"), Path("D:\\ref.png"), 2.0)),
    ],
)
def test_option_values_parse(value: str, expected: IPAdapterOption) -> None:
    assert parse_ip_adapter_option(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("ip.bin", "expected WEIGHTS:IMAGE\\[:SCALE\\]"),
        ("ip.bin:ref.png:0.5:1", "expected WEIGHTS:IMAGE"),
        ("ip.bin:ref.png:nan", "the scale must be a finite number, got 'nan'"),
        ("ip.bin:ref.png:big", "the scale must be a finite number, got 'big'"),
    ],
)
def test_malformed_option_values_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ip_adapter_option(value)


def test_generate_with_an_ip_adapter_steers_the_image(files: SimpleNamespace, tmp_path: Path) -> None:
    common = ["generate", "a cat", "--model", str(files.model), "--steps", "2", "--size", "64x64", "--seed", "1"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    option = f"{files.weights}:{files.image}:0.8"
    assert main([*common, "--ip-adapter", option, "--out", str(tmp_path / "ip.png")]) == 0
    encoder = str(files.weights.parent / "image_encoder")
    other = files.root / "elsewhere" / "ip.safetensors"
    if not other.exists():
        other.parent.mkdir()
        other.write_bytes(files.weights.read_bytes())
    assert main([*common, "--ip-adapter", f"{other}:{files.image}:0.8", "--ip-adapter-encoder", encoder,
                 "--out", str(tmp_path / "encoder.png")]) == 0  # fmt: skip
    plain, steered, encoder_given = (
        np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "ip.png", "encoder.png")
    )
    assert np.abs(plain.astype(int) - steered.astype(int)).max() > 0
    assert np.array_equal(steered, encoder_given)


def test_the_option_injects_one_adapter_per_value_and_a_bad_value_leaves_the_model_unchanged(
    files: SimpleNamespace, tmp_path: Path
) -> None:
    model = StableDiffusion_1.from_pretrained(files.model)
    layers = repr(model.unet)
    apply = registry().generate_options["--ip-adapter"].apply
    with pytest.raises(GenerateError, match="the image .*missing.png: no such file") as error:
        apply(model, [f"{files.weights}:{files.image}", f"{files.weights}:{tmp_path / 'missing.png'}"])
    assert "while loading --ip-adapter" in "\n".join(getattr(error.value, "__notes__", []))
    lonely = tmp_path / "lonely" / "ip.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(files.weights.read_bytes())
    with pytest.raises(
        FileNotFoundError,
        match="no image encoder given, and no image_encoder/ folder .* with --ip-adapter-encoder FOLDER",
    ):
        apply(model, [f"{files.weights}:{files.image}", f"{lonely}:{files.image}"])
    with pytest.raises(TypeError, match="IP-Adapter adapts a SD1UNet"):
        apply(SimpleNamespace(unet=None), [f"{files.weights}:{files.image}"])
    assert repr(model.unet) == layers
    apply(model, [f"{files.weights}:{files.image}:0.5", f"{files.weights}:{files.image}"])
    assert len(list(model.unet.layers(ImageCrossAttention, recurse=True))) == 2 * len(text_cross_attentions(model.unet))


def test_option_values_are_validated_before_the_model_is_loaded(files: SimpleNamespace, tmp_path: Path) -> None:
    validate = registry().generate_options["--ip-adapter"].validate
    assert validate is not None
    validate([f"{files.weights}:{files.image}:0.5"])
    lora = tmp_path / "lora.safetensors"
    save_tensors(lora, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    Image.new("L", (8, 9000)).save(tmp_path / "wide.png")
    cases = {
        f"{tmp_path / 'missing.bin'}:{files.image}": "no such file",
        f"{files.image}:{files.image}": "neither a safetensors file nor a PyTorch checkpoint",
        f"{lora}:{files.image}": "holds no 'image_proj.\\*' and 'ip_adapter.\\*' keys: not IP-Adapter weights",
        f"{files.weights}:{tmp_path / 'missing.png'}": "no such file",
        f"{files.weights}:{tmp_path / 'wide.png'}": "is 8x9000: each side must be from 1 to 8192 pixels",
    }
    for value, message in cases.items():
        with pytest.raises(Exception, match=message):
            validate([value])


def test_encoder_option_is_validated(files: SimpleNamespace, tmp_path: Path) -> None:
    validate = registry().generate_options["--ip-adapter-encoder"].validate
    assert validate is not None
    encoder = str(files.weights.parent / "image_encoder")
    validate([encoder])
    with pytest.raises(ValueError, match="given 2 times"):
        validate([encoder, encoder])
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        validate([str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'model_type' is 'clip'"):
        validate([str(tmp_path)])


def test_an_encoder_of_other_widths_given_on_the_command_line_is_an_error(
    files: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_reference_folder(tmp_path / "bigg", SMALL_VIT_BIGG)
    capsys.readouterr()
    out = tmp_path / "out.png"
    code = main(["generate", "a cat", "--model", str(files.model), "--steps", "1", "--size", "64x64",
                 "--ip-adapter", f"{files.weights}:{files.image}", "--ip-adapter-encoder", str(tmp_path / "bigg"),
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err
    assert (
        error.startswith("refiners generate: error: ")
        and "'image_proj.proj.weight' reads image features of 24" in error
    )
