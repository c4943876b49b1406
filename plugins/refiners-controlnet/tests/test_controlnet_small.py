"""ControlNet and ControlNetAdapter against diffusers on a small SD1-like architecture (fast), loaded from
`save_pretrained` folders through `ControlNet.from_pretrained`. Tolerance: max |ours - reference| <= 1e-4 *
max |reference|, float32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

import refiners_core.fluxion as fl
from refiners_controlnet import ControlNet, ControlNetAdapter, ControlNetResiduals
from refiners_controlnet.testing import (
    SMALL_CONTROLNET_CONFIG,
    assert_residuals_close,
    our_residuals,
    our_unet_output,
    reference_controlnet,
    reference_residuals,
    reference_unet,
    reference_unet_output,
)
from refiners_core.testing import assert_relative_close
from refiners_sd15.testing import SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG as SMALL_UNET_CONFIG
from refiners_sd15.unet import SD15_UNET, SD1UNet

References = tuple[UNet2DConditionModel, ControlNetModel, ControlNetModel]
"""A UNet and two ControlNets."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("small")


@pytest.fixture(scope="module")
def references(folder: Path) -> References:
    """A UNet and two ControlNets, saved with `save_pretrained` into `folder`/unet, controlnet_a, controlnet_b."""
    unet = reference_unet(SMALL_UNET_CONFIG, seed=0)
    first = reference_controlnet(SMALL_CONTROLNET_CONFIG, seed=1)
    second = reference_controlnet(SMALL_CONTROLNET_CONFIG, seed=2)
    unet.save_pretrained(folder / "unet")  # pyright: ignore[reportUnknownMemberType]
    first.save_pretrained(folder / "controlnet_a")  # pyright: ignore[reportUnknownMemberType]
    second.save_pretrained(folder / "controlnet_b")  # pyright: ignore[reportUnknownMemberType]
    return unet, first, second


@pytest.fixture
def unet(references: object, folder: Path) -> SD1UNet:
    return SD1UNet.from_pretrained(folder).eval()


@pytest.fixture
def controlnets(references: object, folder: Path) -> tuple[ControlNet, ControlNet]:
    return (
        ControlNet.from_pretrained(folder / "controlnet_a").eval(),
        ControlNet.from_pretrained(folder / "controlnet_b").eval(),
    )


class Inputs(NamedTuple):
    """Latents, timesteps, text embeddings and conditioning images, for both sides."""

    x: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    condition: torch.Tensor


def inputs(seed: int = 0, batch: int = 2, size: tuple[int, int] = (16, 16)) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    x = torch.randn(batch, 4, height, width, generator=generator)
    timestep = torch.tensor([300.0, 700.0][:batch])
    text = torch.randn(batch, 77, 24, generator=generator)
    return Inputs(x, timestep, text, torch.rand(batch, 3, 8 * height, 8 * width, generator=generator))


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_controlnet_residuals_match_diffusers(
    references: References,
    controlnets: tuple[ControlNet, ControlNet],
    size: tuple[int, int],
) -> None:
    x, timestep, text, condition = inputs(size=size)
    expected = reference_residuals(references[1], x, timestep, text, condition)
    assert_residuals_close(our_residuals(controlnets[0], x, timestep, text, condition), expected)


def test_unet_with_controlnet_matches_diffusers_unet_with_residuals(
    references: References,
    unet: SD1UNet,
    controlnets: tuple[ControlNet, ControlNet],
) -> None:
    reference_model, reference_controlnet_a, _ = references
    x, timestep, text, condition = inputs(seed=1)
    residuals = reference_residuals(reference_controlnet_a, x, timestep, text, condition, scale=0.7)
    expected = reference_unet_output(reference_model, x, timestep, text, residuals)
    without = reference_unet_output(reference_model, x, timestep, text)
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the ControlNet does change the output

    adapter = ControlNetAdapter(unet, controlnets[0], scale=0.7).inject()
    adapter.set_condition(condition)
    assert_relative_close(our_unet_output(unet, x, timestep, text), expected, 1e-4)


def test_a_condition_batch_of_one_applies_to_every_latent(
    references: References,
    unet: SD1UNet,
    controlnets: tuple[ControlNet, ControlNet],
) -> None:
    reference_model, reference_controlnet_a, _ = references
    x, timestep, text, condition = inputs(seed=2)
    condition = condition[:1]
    residuals = reference_residuals(reference_controlnet_a, x, timestep, text, condition.expand(2, -1, -1, -1))
    ControlNetAdapter(unet, controlnets[0]).inject().set_condition(condition)
    assert_relative_close(
        our_unet_output(unet, x, timestep, text),
        reference_unet_output(reference_model, x, timestep, text, residuals),
        1e-4,
    )


def test_two_controlnets_add_their_scaled_residuals_like_multicontrolnet(
    references: References,
    unet: SD1UNet,
    controlnets: tuple[ControlNet, ControlNet],
) -> None:
    reference_model, reference_a, reference_b = references
    x, timestep, text, condition = inputs(seed=3)
    other = torch.rand_like(condition)
    down_a, middle_a = reference_residuals(reference_a, x, timestep, text, condition, scale=0.8)
    down_b, middle_b = reference_residuals(reference_b, x, timestep, text, other, scale=0.3)
    summed = ([a + b for a, b in zip(down_a, down_b)], middle_a + middle_b)
    expected = reference_unet_output(reference_model, x, timestep, text, summed)

    first = ControlNetAdapter(unet, controlnets[0], scale=0.8).inject().set_condition(condition)
    second = ControlNetAdapter(unet, controlnets[1], scale=0.3).inject().set_condition(other)
    assert_relative_close(our_unet_output(unet, x, timestep, text), expected, 1e-4)

    second.scale = 0.0  # the scale can change at any time; 0 leaves only the first ControlNet's residuals
    only_a = reference_unet_output(reference_model, x, timestep, text, (down_a, middle_a))
    assert_relative_close(our_unet_output(unet, x, timestep, text), only_a, 1e-4)
    assert first.is_injected and second.is_injected


def test_eject_in_any_order_restores_the_exact_unet(unet: SD1UNet, controlnets: tuple[ControlNet, ControlNet]) -> None:
    x, timestep, text, condition = inputs(seed=4)
    original_state = {key: value.clone() for key, value in unet.state_dict().items()}
    original_layers = list(unet)
    original_output = our_unet_output(unet, x, timestep, text)

    first = ControlNetAdapter(unet, controlnets[0]).inject().set_condition(condition)
    second = ControlNetAdapter(unet, controlnets[1], scale=0.5).inject().set_condition(condition)
    assert [type(layer) for layer in unet][:2] == [ControlNet, ControlNet]
    assert sum(isinstance(layer, ControlNetResiduals) for layer in unet) == 2
    assert any(key.startswith("ControlNet_1.") for key in unet.state_dict())  # the weights are in the UNet's
    assert not torch.equal(our_unet_output(unet, x, timestep, text), original_output)

    first.eject()  # not in the reverse order of inject
    assert not first.is_injected and second.is_injected
    second.eject()
    assert list(unet) == original_layers
    state = unet.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[key], value) for key, value in original_state.items())
    assert torch.equal(our_unet_output(unet, x, timestep, text), original_output)
    assert controlnets[0].parent is None and controlnets[0].context_name not in unet.provider.contexts

    # The condition stays with the ControlNet: injecting again gives the same output as before.
    first.inject()
    with_first = our_unet_output(unet, x, timestep, text)
    first.eject()
    ControlNetAdapter(unet, controlnets[0]).inject()
    assert torch.equal(our_unet_output(unet, x, timestep, text), with_first)


def test_a_new_controlnet_from_the_unet_leaves_its_output_unchanged(unet: SD1UNet) -> None:
    controlnet = ControlNet.from_unet(unet)
    unet_weights = unet.state_dict()
    for key, value in controlnet.state_dict().items():
        if key in unet_weights:
            assert torch.equal(value, unet_weights[key]), key  # the encoder starts as a copy of the UNet's
    x, timestep, text, condition = inputs(seed=5)
    expected = our_unet_output(unet, x, timestep, text)
    adapter = ControlNetAdapter(unet, controlnet).inject().set_condition(condition)
    assert torch.equal(our_unet_output(unet, x, timestep, text), expected)  # zero convolutions: zero residuals
    assert {name for name, _ in adapter.named_parameters()} == {f"controlnet.{key}" for key in controlnet.state_dict()}


def test_adapter_misuse_raises_clear_errors(unet: SD1UNet, controlnets: tuple[ControlNet, ControlNet]) -> None:
    adapter = ControlNetAdapter(unet, controlnets[0])
    with pytest.raises(fl.AdapterError, match="not injected"):
        adapter.eject()
    with pytest.raises(fl.AdapterError, match="in place"):
        adapter.inject(fl.Chain())
    adapter.inject()
    with pytest.raises(fl.AdapterError, match="already injected"):
        adapter.inject()
    x, timestep, text, _ = inputs()
    with pytest.raises(fl.ContextError, match="no conditioning image: call set_condition"):
        our_unet_output(unet, x, timestep, text)
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\), got a tensor of shape \(3, 128, 128\)"):
        adapter.set_condition(torch.rand(3, 128, 128))
    adapter.eject()

    other_unet = SD1UNet(
        replace(SD15_UNET, block_out_channels=(32, 64), cross_attention_levels=(True, False), norm_num_groups=8)
    )
    with pytest.raises(ValueError, match="does not fit the UNet"):
        ControlNetAdapter(other_unet, controlnets[0])
    with pytest.raises(TypeError, match="adapts a SD1UNet"):
        ControlNetAdapter(fl.Chain(), controlnets[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), "1.0x"])
def test_a_scale_or_condition_that_is_not_finite_is_refused(
    unet: SD1UNet, controlnets: tuple[ControlNet, ControlNet], scale: object
) -> None:
    with pytest.raises(ValueError, match="ControlNet scale must be a finite number"):
        ControlNetAdapter(unet, controlnets[0], scale=scale)  # type: ignore[arg-type]
    adapter = ControlNetAdapter(unet, controlnets[0], scale=0.5)
    with pytest.raises(ValueError, match="ControlNet scale must be a finite number"):
        adapter.scale = scale  # type: ignore[assignment]
    assert adapter.scale == 0.5
    condition = torch.rand(1, 3, 64, 64)
    condition[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="the ControlNet condition has 1 NaN and 0 infinite values out of 12288"):
        adapter.set_condition(condition)


def test_a_condition_of_another_size_is_resized_to_the_generated_size(
    unet: SD1UNet, controlnets: tuple[ControlNet, ControlNet]
) -> None:
    x, timestep, text, _ = inputs(seed=6)
    large = torch.rand(2, 3, 200, 160)
    resized = torch.nn.functional.interpolate(large, size=(128, 128), mode="bilinear", antialias=True)
    adapter = ControlNetAdapter(unet, controlnets[0]).inject().set_condition(resized)
    expected = our_unet_output(unet, x, timestep, text)
    adapter.set_condition(large)
    assert torch.equal(our_unet_output(unet, x, timestep, text), expected)
