"""T2IAdapter in a SD1.5-like UNet: one UNet call against diffusers' `UNet2DConditionModel` with
`down_intrablock_additional_residuals` (within 1e-4 of max |reference|), several adapters, ControlNet alongside,
exact eject, and the errors that leave the UNet untouched."""

# pyright: reportPrivateImportUsage=false
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import T2IAdapter as DiffusersT2IAdapter
from diffusers import UNet2DConditionModel
from PIL import Image

import refiners_core.fluxion as fl
from refiners_controlnet import ControlNet, ControlNetAdapter, image_to_condition
from refiners_core.testing import assert_relative_close
from refiners_core.weights import WeightsError
from refiners_sd15.unet import SD1UNet
from refiners_sdxl import SDXLUNet
from refiners_t2i_adapter import T2IAdapter, T2IFeatures, T2IResidual, image_to_tensor
from refiners_t2i_adapter.testing import (
    SMALL_CONTROLNET_CONFIG,
    SMALL_FULL_ADAPTER,
    SMALL_GRAY_ADAPTER,
    SMALL_LIGHT_ADAPTER,
    SMALL_SDXL_UNET_CONFIG,
    SMALL_UNET_CONFIG,
    SMALL_XL_ADAPTER,
    random_image,
    reference_adapter,
    reference_controlnet,
    reference_unet,
    save_adapter,
)

TOLERANCE = 1e-4
SIZE = (64, 48)  # (width, height) of the generated image: latents of 6x8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t2i")
    reference_unet(SMALL_UNET_CONFIG).save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    reference_controlnet(SMALL_CONTROLNET_CONFIG).save_pretrained(folder / "controlnet")  # pyright: ignore[reportUnknownMemberType]
    for name, config, seed in [
        ("full", SMALL_FULL_ADAPTER, 1),
        ("full_2", SMALL_FULL_ADAPTER, 2),
        ("light", SMALL_LIGHT_ADAPTER, 3),
        ("gray", SMALL_GRAY_ADAPTER, 4),
        ("xl", SMALL_XL_ADAPTER, 5),
    ]:
        save_adapter(reference_adapter(config, seed), folder / name)
    return folder


def load_unet(folder: Path) -> SD1UNet:
    return SD1UNet.from_pretrained(folder).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    width, height = SIZE
    x = torch.randn(2, 4, height // 8, width // 8, generator=generator)
    return x, torch.tensor([500.0]), torch.randn(2, 77, 24, generator=generator)


@torch.no_grad()
def ours(unet: fl.Chain, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    assert isinstance(unet, SD1UNet)
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    return unet(x)


@torch.no_grad()
def reference_features(folder: Path, names: list[str], images: list[Image.Image], scales: list[float]) -> list[Any]:
    """diffusers' adapter states as its pipelines make them: each adapter's features times its scale, summed."""
    total: list[torch.Tensor] = []
    for name, image, scale in zip(names, images, scales):
        adapter: Any = DiffusersT2IAdapter.from_pretrained(folder / name)
        features = [scale * feature for feature in adapter(image_to_tensor(image))]
        total = features if not total else [a + b for a, b in zip(total, features)]
    return total


@torch.no_grad()
def reference_output(
    folder: Path, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, **residuals: Any
) -> torch.Tensor:
    unet: Any = UNet2DConditionModel.from_pretrained(folder / "unet")
    return unet(x, timestep, encoder_hidden_states=text, **residuals).sample


@pytest.mark.parametrize(
    "names, scales",
    [(["full"], [0.8]), (["light"], [1.0]), (["full", "full_2"], [0.7, 0.4])],
    ids=["full", "light", "two-adapters"],
)
def test_one_unet_call_matches_diffusers_intrablock_residuals(
    folder: Path, names: list[str], scales: list[float]
) -> None:
    unet = load_unet(folder)
    images = [random_image(SIZE, seed) for seed in range(len(names))]
    for name, image, scale in zip(names, images, scales):
        T2IAdapter.from_pretrained(unet, folder / name, scale=scale).inject().set_condition(image)
    x, timestep, text = inputs()
    features = reference_features(folder, names, images, scales)
    expected = reference_output(folder, x, timestep, text, down_intrablock_additional_residuals=features)
    without = reference_output(folder, x, timestep, text)
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the adapters do steer the UNet
    assert_relative_close(ours(unet, x, timestep, text), expected, TOLERANCE)


def test_together_with_a_controlnet_matches_diffusers(folder: Path) -> None:
    unet = load_unet(folder)
    image, edges = random_image(SIZE, 0), random_image(SIZE, 1)
    t2i = T2IAdapter.from_pretrained(unet, folder / "full", scale=0.8).inject().set_condition(image)
    controlnet = ControlNet.from_pretrained(folder / "controlnet").eval()
    ControlNetAdapter(unet, controlnet, scale=0.6).inject().set_condition(image_to_condition(edges))
    x, timestep, text = inputs()
    with torch.no_grad():
        reference: Any = reference_controlnet(SMALL_CONTROLNET_CONFIG)
        down, middle = reference(
            x,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=image_to_condition(edges),
            conditioning_scale=0.6,
            return_dict=False,
        )
    expected = reference_output(
        folder,
        x,
        timestep,
        text,
        down_intrablock_additional_residuals=reference_features(folder, ["full"], [image], [0.8]),
        down_block_additional_residuals=down,
        mid_block_additional_residual=middle,
    )
    assert_relative_close(ours(unet, x, timestep, text), expected, TOLERANCE)
    t2i.eject()
    assert not any(isinstance(layer, T2IResidual) for layer in unet.layers(fl.Module, recurse=True))


def test_scale_changes_without_rebuilding_and_zero_is_no_adapter(folder: Path) -> None:
    unet = load_unet(folder)
    x, timestep, text = inputs()
    plain = ours(unet, x, timestep, text)
    t2i = T2IAdapter.from_pretrained(unet, folder / "full", scale=0.5).inject().set_condition(random_image(SIZE, 0))
    steered = ours(unet, x, timestep, text)
    t2i.scale = 0.0
    assert torch.equal(ours(unet, x, timestep, text), plain)
    t2i.scale = 0.5
    assert torch.equal(ours(unet, x, timestep, text), steered)
    assert all(residual.scale == 0.5 for residual in unet.layers(T2IResidual))
    with pytest.raises(ValueError, match="T2I-Adapter scale must be a finite number"):
        t2i.scale = float("nan")


def test_features_are_computed_once_per_size_and_follow_the_condition(folder: Path) -> None:
    unet = load_unet(folder)
    t2i = T2IAdapter.from_pretrained(unet, folder / "full").inject().set_condition(random_image((32, 32), 0))
    x, timestep, text = inputs()
    ours(unet, x, timestep, text)
    with torch.no_grad():
        features = t2i.features(*reversed(SIZE))
        assert features is t2i.features(*reversed(SIZE))  # cached
    trained = t2i.features(*reversed(SIZE))  # with gradients: computed again, through the adapter's weights
    assert trained is not features and trained[0].grad_fn is not None and torch.equal(trained[0], features[0])
    assert [tuple(feature.shape) for feature in features] == [(1, 32, 6, 8), (1, 64, 3, 4), (1, 64, 2, 2)]
    t2i.set_condition(random_image((32, 32), 1))
    assert not torch.equal(t2i.features(*reversed(SIZE))[0], features[0])


def test_eject_restores_the_unet_exactly_in_any_order(folder: Path) -> None:
    unet = load_unet(folder)
    x, timestep, text = inputs()
    state, tree, plain = dict(unet.state_dict()), repr(unet), ours(unet, x, timestep, text)
    first = T2IAdapter.from_pretrained(unet, folder / "full").inject().set_condition(random_image(SIZE, 0))
    second = T2IAdapter.from_pretrained(unet, folder / "light").inject().set_condition(random_image(SIZE, 1))
    controlnet = ControlNetAdapter(unet, ControlNet.from_pretrained(folder / "controlnet"), scale=0.5).inject()
    controlnet.set_condition(image_to_condition(random_image(SIZE, 2)))
    assert not torch.equal(ours(unet, x, timestep, text), plain)
    first.eject()
    controlnet.eject()
    second.eject()
    assert repr(unet) == tree and unet.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in unet.state_dict().items())
    assert torch.equal(ours(unet, x, timestep, text), plain)
    assert set(unet.provider.contexts) == {"diffusion", "unet"}
    with pytest.raises(fl.AdapterError, match="it is not injected"):
        first.eject()
    first.inject()  # the condition is kept
    assert not torch.equal(ours(unet, x, timestep, text), plain)
    with pytest.raises(fl.AdapterError, match="already injected"):
        first.inject()


def test_an_adapter_without_condition_says_so(folder: Path) -> None:
    unet = load_unet(folder)
    T2IAdapter.from_pretrained(unet, folder / "full").inject()
    with pytest.raises(fl.ContextError, match=r"no condition image: call set_condition\(image\)"):
        ours(unet, *inputs())


def test_weights_of_another_kind_are_refused_with_the_unet_untouched(folder: Path, tmp_path: Path) -> None:
    unet = load_unet(folder)
    tree = repr(unet)
    with pytest.raises(WeightsError, match=r"controlnet/config.json: _class_name='ControlNetModel' is a ControlNet"):
        T2IAdapter.from_pretrained(unet, folder / "controlnet")
    with pytest.raises(FileNotFoundError, match="no t2i_adapter in .*: it has no config.json"):
        T2IAdapter.from_pretrained(unet, folder)
    ControlNet.from_pretrained(folder / "controlnet").save(tmp_path / "controlnet.safetensors")
    with pytest.raises(WeightsError, match="controlnet.safetensors holds a 'controlnet', not a 't2i_adapter'"):
        T2IAdapter.from_pretrained(unet, tmp_path / "controlnet.safetensors")
    assert repr(unet) == tree


def test_an_sdxl_adapter_on_an_sd15_unet_and_the_reverse_are_refused(folder: Path) -> None:
    unet = load_unet(folder)
    tree = repr(unet)
    with pytest.raises(ValueError, match=r"adapter_type='full_adapter_xl'.* feature 0 has 32 channels at 1/16"):
        T2IAdapter.from_pretrained(unet, folder / "xl")
    assert repr(unet) == tree
    from refiners_sd15.unet import unet_config_from_diffusers

    sdxl_unet = SDXLUNet(unet_config_from_diffusers({"_class_name": "UNet2DConditionModel", **SMALL_SDXL_UNET_CONFIG}))
    with pytest.raises(ValueError, match=r"an SDXL UNet.*feature 0 has 32 channels at 1/8 of the image size, the UNet"):
        T2IAdapter.from_pretrained(sdxl_unet, folder / "full")
    with pytest.raises(TypeError, match="a T2I-Adapter adapts a UNet"):
        T2IAdapter.from_pretrained(fl.Chain(fl.Linear(2, 2)), folder / "full")


@pytest.mark.parametrize(
    "image, message",
    [
        (Image.new("RGB", (8, 8), (200, 10, 10)), "reads grayscale images .*the RGB condition image has colours"),
        (Image.new("CMYK", (8, 8), (0, 200, 10, 0)), "the CMYK condition image has colours"),
        (torch.rand(1, 3, 8, 8), r"must be a \(B, 1, H, W\) tensor \(in_channels=1\), got shape \(1, 3, 8, 8\)"),
        (torch.full((1, 1, 8, 8), float("nan")), "the T2I-Adapter condition has 64 NaN"),
        ("edges.png", "image must be a PIL.Image.Image"),
    ],
)
def test_unusable_conditions_are_refused_keeping_the_previous_one(folder: Path, image: Any, message: str) -> None:
    unet = load_unet(folder)
    t2i = T2IAdapter.from_pretrained(unet, folder / "gray").inject().set_condition(Image.new("L", (8, 8), 7))
    before = t2i.features(8, 8)[0]
    with pytest.raises((ValueError, TypeError), match=message):
        t2i.set_condition(image)
    assert torch.equal(t2i.features(8, 8)[0], before)


def test_grey_images_of_any_mode_give_the_same_condition(folder: Path) -> None:
    unet = load_unet(folder)
    t2i = T2IAdapter.from_pretrained(unet, folder / "gray").inject()
    grey = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    expected = t2i.set_condition(Image.fromarray(grey)).features(16, 16)[0]
    for image in (Image.fromarray(grey).convert("RGB"), Image.fromarray(grey.astype(np.uint16) * 257)):
        assert torch.equal(t2i.set_condition(image).features(16, 16)[0], expected)
    assert isinstance(unet[0], T2IFeatures)


def test_a_hub_id_loads_offline_from_the_hub_cache(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "hub" / "models--acme--t2i-canny"
    shutil.copytree(folder / "full", repository / "snapshots" / commit)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    unet = load_unet(folder)
    t2i = T2IAdapter.from_pretrained(unet, "acme/t2i-canny", scale=0.3)
    reference = T2IAdapter.from_pretrained(unet, folder / "full")
    assert t2i.scale == 0.3
    assert all(
        torch.equal(a, b) for a, b in zip(t2i.model.state_dict().values(), reference.model.state_dict().values())
    )
    tree = repr(unet)
    with pytest.raises(FileNotFoundError, match="acme/not-cached"):
        T2IAdapter.from_pretrained(unet, "acme/not-cached")
    assert repr(unet) == tree


def test_the_adapter_follows_the_unet_dtype(folder: Path) -> None:
    """Loaded for a bfloat16 UNet, the adapter is bfloat16 too, and the step stays close to float32's."""
    x, timestep, text = inputs()
    image = random_image(SIZE, 0)
    outputs: list[torch.Tensor] = []
    for dtype in (torch.float32, torch.bfloat16):
        unet = SD1UNet.from_pretrained(folder, dtype=dtype).eval()
        t2i = T2IAdapter.from_pretrained(unet, folder / "full").inject().set_condition(image)
        assert t2i.model.dtype == dtype
        outputs.append(ours(unet, x.to(dtype), timestep, text.to(dtype)).float())
    assert_relative_close(outputs[1], outputs[0], 5e-2)
