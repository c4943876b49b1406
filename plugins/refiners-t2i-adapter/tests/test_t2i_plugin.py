"""refiners-t2i-adapter as a plugin: found through its entry point, its `t2i_adapter` adapter in the registry and
`refiners plugins`, and its `--t2i-adapter FOLDER:IMAGE[:SCALE]` option of `refiners generate`, with small random
adapter folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from refiners_core.cli import main
from refiners_core.plugins import registry, resolve
from refiners_core.testing.plugins import discovered_plugin, listed_plugin
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import (
    MALFORMED_ADAPTER_VALUES,
    adapter_value_cases,
    cache_hub_config,
    small_sd15_components,
    write_bad_diffusers_sources,
)
from refiners_sd15.unet import SD1UNet
from refiners_t2i_adapter import T2IAdapter, T2IAdapterModel, T2IFeatures, T2IResidual
from refiners_t2i_adapter.cli import T2IAdapterOption, parse_t2i_adapter_option
from refiners_t2i_adapter.testing import random_image, reference_adapter, save_adapter

# The adapter of refiners_sd15.testing's small UNet (two levels of 32 channels, attention on the first).
SMALL_SD15_ADAPTER = {"in_channels": 3, "channels": [32, 32], "num_res_blocks": 1}


def small_unet() -> SD1UNet:
    unet = small_sd15_components(4)["unet"]
    assert isinstance(unet, SD1UNet)
    return unet.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("option")
    save_adapter(reference_adapter(SMALL_SD15_ADAPTER, 1), folder / "adapter")
    save_adapter(reference_adapter({**SMALL_SD15_ADAPTER, "in_channels": 1}, 2), folder / "gray")
    random_image((64, 48), 0).save(folder / "edges.png")
    return folder / "adapter", folder / "gray", folder / "edges.png"


def test_refiners_t2i_adapter_is_discovered_through_its_entry_point() -> None:
    discovered_plugin("refiners-t2i-adapter", "t2i_adapter = refiners_t2i_adapter.plugin")
    assert resolve(registry().adapters["t2i_adapter"].factory) is T2IAdapter
    option = registry().generate_options["--t2i-adapter"]
    assert option.applies_to("sd15") and option.applies_to("sdxl")


def test_refiners_plugins_lists_the_adapter_and_option() -> None:
    record = listed_plugin("refiners-t2i-adapter")
    assert record["adapters"] == ["t2i_adapter"] and record["generate_options"] == ["--t2i-adapter"]


def test_the_registered_adapter_steers_a_unet(files: tuple[Path, Path, Path]) -> None:
    unet = small_unet()
    model = T2IAdapterModel.from_pretrained(files[0])
    adapter = registry().adapters["t2i_adapter"].create(unet, model=model, scale=0.5)
    assert isinstance(adapter, T2IAdapter) and adapter.scale == 0.5
    adapter.inject()
    assert isinstance(unet[0], T2IFeatures)
    adapter.eject()
    with pytest.raises(TypeError, match="cannot wrap a T2IAdapterModel"):
        registry().adapters["t2i_adapter"].create(model, model=model)


@pytest.mark.parametrize(
    "value, expected", adapter_value_cases("TencentARC/t2iadapter_canny_sd15v2", "e.png", r"C:\t2i\canny")
)
def test_option_values_parse(value: str, expected: tuple[str, Path, float]) -> None:
    assert parse_t2i_adapter_option(value) == T2IAdapterOption(*expected)


@pytest.mark.parametrize("value, message", MALFORMED_ADAPTER_VALUES)
def test_malformed_option_values_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_t2i_adapter_option(value)


def test_generate_option_injects_one_adapter_per_value(files: tuple[Path, Path, Path]) -> None:
    adapter, gray, image = files
    model = SimpleNamespace(unet=small_unet())
    registry().generate_options["--t2i-adapter"].apply(model, [f"{adapter}:{image}:0.5", f"{adapter}:{image}"])
    features = [layer for layer in model.unet if isinstance(layer, T2IFeatures)]
    assert len(features) == 2
    assert sorted(residual.scale for residual in model.unet.layers(T2IResidual)) == [0.5, 0.5, 1.0, 1.0]
    with torch.no_grad():
        assert [tuple(f.shape) for f in features[0].features(48, 64, torch.device("cpu"), torch.float32)] == [
            (1, 32, 6, 8),
            (1, 32, 3, 4),
        ]


def test_a_bad_option_value_leaves_the_model_unchanged(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    adapter, gray, image = files
    model = SimpleNamespace(unet=small_unet())
    tree = repr(model.unet)
    apply = registry().generate_options["--t2i-adapter"].apply
    with pytest.raises(FileNotFoundError, match="cannot read the image"):
        apply(model, [f"{adapter}:{image}", f"{adapter}:{tmp_path / 'missing.png'}"])
    with pytest.raises(FileNotFoundError) as error:
        apply(model, [f"{adapter}:{image}", f"{tmp_path / 'nowhere'}:{image}"])
    assert "while loading --t2i-adapter" in "\n".join(getattr(error.value, "__notes__", []))
    with pytest.raises(ValueError, match="reads grayscale images"):  # a colour image for a grayscale adapter
        apply(model, [f"{adapter}:{image}", f"{gray}:{image}"])
    with pytest.raises(TypeError, match="needs a Stable Diffusion model with a UNet"):
        apply(SimpleNamespace(), [f"{adapter}:{image}"])
    assert repr(model.unet) == tree


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{adapter}:{image}:nan", "the scale must be a finite number, got 'nan'"),
        ("{adapter}:{missing}", "no image at"),
        ("{adapter}:{adapter}", "cannot read the image"),
        ("{image}:{image}", "edges.png is neither a safetensors file nor a PyTorch checkpoint"),
        ("{empty}:{image}", "has no config.json"),
        ("{no_weights}:{image}", "has no diffusion_pytorch_model.safetensors \\(or .bin\\) weights"),
        ("./no/such/folder:{image}", "neither a local file or folder nor a hub id"),
        ("{adapter}:{wide}", "is 8x9000: each side must be at most 8192"),
    ],
)
def test_option_values_are_validated_before_the_model_is_loaded(
    files: tuple[Path, Path, Path], tmp_path: Path, value: str, message: str
) -> None:
    adapter, _, image = files
    value = value.format(adapter=adapter, image=image, **write_bad_diffusers_sources(tmp_path))
    validate = registry().generate_options["--t2i-adapter"].validate
    assert validate is not None
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate([f"{adapter}:{image}", value])
    saved = tmp_path / "adapter.safetensors"
    T2IAdapterModel.from_pretrained(adapter).save(saved)
    validate([f"{adapter}:{image}:0.5", f"{saved}:{image}"])


def test_a_hub_id_is_validated_from_the_offline_hub_cache(
    files: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, image = files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_hub_config(tmp_path / "hub", "acme/t2i-canny")
    validate = registry().generate_options["--t2i-adapter"].validate
    assert validate is not None
    validate([f"acme/t2i-canny:{image}"])
    with pytest.raises(FileNotFoundError) as error:
        validate([f"acme/not-cached:{image}"])
    assert str(error.value).startswith(f"--t2i-adapter 'acme/not-cached:{image}': ") and "\n" not in str(error.value)


def test_refiners_generate_runs_with_two_t2i_adapters(
    files: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, gray, image = files
    Image.open(image).convert("L").save(tmp_path / "edges_l.png")
    folder = tmp_path / "sd15"
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    outputs: list[torch.Tensor] = []
    for options in (
        [],
        ["--t2i-adapter", f"{adapter}:{image}:0.8", "--t2i-adapter", f"{gray}:{tmp_path / 'edges_l.png'}"],
    ):
        out = tmp_path / f"out{len(options)}.png"
        arguments = ["generate", "a cat", "--model", str(folder), "--steps", "2", "--size", "64x48", "--seed", "1"]
        assert main([*arguments, *options, "--out", str(out)]) == 0, capsys.readouterr().err
        with Image.open(out) as result:
            assert result.size == (64, 48)
            outputs.append(torch.from_numpy(np.array(result)))
    assert not torch.equal(outputs[0], outputs[1])  # the adapters changed the image
