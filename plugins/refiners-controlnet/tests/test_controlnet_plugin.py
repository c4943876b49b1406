"""refiners-controlnet as a plugin: found through its entry point, its `controlnet` adapter in the registry and
`refiners plugins`, and its `--controlnet FOLDER:IMAGE[:SCALE]` option of `refiners generate`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from refiners_controlnet import ControlNet, ControlNetAdapter, ControlNetResiduals, image_to_condition
from refiners_controlnet.cli import ControlNetOption, parse_controlnet_option
from refiners_controlnet.testing import SMALL_CONTROLNET_CONFIG, reference_controlnet
from refiners_core.plugins import registry, resolve
from refiners_core.testing.plugins import discovered_plugin, listed_plugin
from refiners_sd15.testing import (
    MALFORMED_ADAPTER_VALUES,
    adapter_value_cases,
    cache_hub_config,
    write_bad_diffusers_sources,
)
from refiners_sd15.testing import SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG as SMALL_UNET_CONFIG
from refiners_sd15.unet import SD1UNet, unet_config_from_diffusers


def small_unet() -> SD1UNet:
    return SD1UNet(unet_config_from_diffusers(SMALL_UNET_CONFIG)).eval()


def test_refiners_controlnet_is_discovered_through_its_entry_point() -> None:
    discovered_plugin("refiners-controlnet", "controlnet = refiners_controlnet.plugin")
    assert resolve(registry().adapters["controlnet"].factory) is ControlNetAdapter
    assert registry().generate_options["--controlnet"].applies_to("sd15")


def test_refiners_plugins_lists_the_controlnet_adapter_and_option() -> None:
    record = listed_plugin("refiners-controlnet")
    assert record["adapters"] == ["controlnet"]
    assert record["generate_options"] == ["--controlnet"]


def test_the_registered_adapter_controls_a_unet() -> None:
    unet = small_unet()
    controlnet = ControlNet.from_unet(unet)
    adapter = registry().adapters["controlnet"].create(unet, controlnet=controlnet, scale=0.5)
    assert isinstance(adapter, ControlNetAdapter) and adapter.scale == 0.5
    adapter.inject()
    assert unet[0] is controlnet
    adapter.eject()
    with pytest.raises(TypeError, match="cannot wrap a ControlNet"):
        registry().adapters["controlnet"].create(controlnet, controlnet=controlnet)


@pytest.mark.parametrize(
    "value, expected", adapter_value_cases("lllyasviel/sd-controlnet-canny", "edges.png", r"C:\nets\canny")
)
def test_option_values_parse(value: str, expected: tuple[str, Path, float]) -> None:
    assert parse_controlnet_option(value) == ControlNetOption(*expected)


@pytest.mark.parametrize("value, message", MALFORMED_ADAPTER_VALUES)
def test_malformed_option_values_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_controlnet_option(value)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("option")
    reference_controlnet(SMALL_CONTROLNET_CONFIG).save_pretrained(folder / "controlnet")  # pyright: ignore[reportUnknownMemberType]
    pixels = torch.randint(0, 256, (96, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(folder / "edges.png")
    return folder / "controlnet", folder / "edges.png"


def test_generate_option_injects_one_controlnet_per_value(files: tuple[Path, Path]) -> None:
    folder, image = files
    model = SimpleNamespace(unet=small_unet())
    registry().generate_options["--controlnet"].apply(model, [f"{folder}:{image}:0.5", f"{folder}:{image}"])
    residuals = [layer for layer in model.unet if isinstance(layer, ControlNetResiduals)]
    assert [layer.scale for layer in residuals] == [1.0, 0.5]  # each new one goes first after the middle block
    controlnet = model.unet[0]
    assert isinstance(controlnet, ControlNet)
    condition = controlnet.use_context(controlnet.context_name)["condition"]
    with Image.open(image) as opened:
        assert torch.equal(condition, image_to_condition(opened))
    assert condition.shape == (1, 3, 96, 64) and 0 <= condition.min() and condition.max() <= 1


def test_a_bad_option_value_leaves_the_model_unchanged(files: tuple[Path, Path], tmp_path: Path) -> None:
    folder, image = files
    model = SimpleNamespace(unet=small_unet())
    layers = list(model.unet)
    apply = registry().generate_options["--controlnet"].apply
    with pytest.raises(FileNotFoundError, match="cannot read the image"):
        apply(model, [f"{folder}:{image}", f"{folder}:{tmp_path / 'missing.png'}"])
    with pytest.raises(FileNotFoundError) as error:
        apply(model, [f"{folder}:{image}", f"{tmp_path / 'nowhere'}:{image}"])
    assert "while loading --controlnet" in "\n".join(getattr(error.value, "__notes__", []))
    with pytest.raises(TypeError, match="needs a Stable Diffusion model with a UNet"):
        apply(SimpleNamespace(), [f"{folder}:{image}"])
    assert list(model.unet) == layers


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{folder}:{image}:nan", "the scale must be a finite number, got 'nan'"),
        ("{folder}:{image}:inf", "the scale must be a finite number"),
        ("{folder}:{missing}", "no image at"),
        ("{folder}:{folder}", "cannot read the image"),
        ("{image}:{image}", "edges.png is neither a safetensors file nor a PyTorch checkpoint"),
        ("{empty}:{image}", "has no config.json"),
        ("{no_weights}:{image}", "has no diffusion_pytorch_model.safetensors \\(or .bin\\) weights"),
        ("{pointer}:{image}", "is a git-lfs pointer"),
        ("./no/such/folder:{image}", "neither a local file or folder nor a hub id"),
        ("{folder}:{wide}", "is 8x9000: each side must be at most 8192"),
    ],
)
def test_option_values_are_validated_before_the_model_is_loaded(
    files: tuple[Path, Path], tmp_path: Path, value: str, message: str
) -> None:
    folder, image = files
    value = value.format(folder=folder, image=image, **write_bad_diffusers_sources(tmp_path))
    validate = registry().generate_options["--controlnet"].validate
    assert validate is not None
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate([f"{folder}:{image}", value])
    saved = tmp_path / "controlnet.safetensors"
    ControlNet.from_pretrained(folder, subfolder="").save(saved)
    validate([f"{folder}:{image}:0.5", f"{saved}:{image}"])


def test_a_hub_id_is_validated_from_the_hub_cache_before_the_model_is_loaded(
    files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, a cached hub id passes and one missing from the cache is named with where the cache is."""
    _, image = files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_hub_config(tmp_path / "hub", "acme/controlnet-canny")
    validate = registry().generate_options["--controlnet"].validate
    assert validate is not None
    validate([f"acme/controlnet-canny:{image}"])
    for missing in ("acme/not-cached", "lllyasviel/sd-controlnet-canny"):
        with pytest.raises(FileNotFoundError) as error:
            validate([f"{missing}:{image}"])
        message = str(error.value)
        assert message.startswith(f"--controlnet '{missing}:{image}': ") and "\n" not in message
        assert f"{tmp_path}/hub/models--{missing.replace('/', '--')}/snapshots/" in message


def test_conditioning_images_are_read_by_meaning() -> None:
    """A 16-bit white image is white and a float one in [0, 1] scaled, not clipped to white or black."""
    white = image_to_condition(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.equal(image_to_condition(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))), white)
    grey = image_to_condition(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)))
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255))
