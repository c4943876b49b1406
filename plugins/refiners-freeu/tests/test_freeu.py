"""FreeU against its reference, diffusers' `UNet2DConditionModel.enable_freeu(s1, s2, b1, b2)`.

Reference UNets get random weights (every parameter drawn, norms and biases included); ours load them through
refiners-sd15's key mapping. Parity is checked in float32 on one noise prediction:
max |ours - reference| <= 1e-4 * max |reference|. Each test also checks that FreeU changes the prediction by far
more than that, so that a FreeU doing nothing cannot pass.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

import refiners_core.fluxion as fl
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.testing import assert_relative_close, relative_error
from refiners_freeu import SD15_SCALES, FourierFilter, FreeU, FreeUAdapter
from refiners_sd15.testing import SD15_UNET_CONFIG, random_diffusers_unet
from refiners_sd15.testing import SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG as SMALL_UNET_CONFIG
from refiners_sd15.unet import ConcatenateSkip, SD1UNet, UpBlocks, diffusers_unet_mapping, unet_config_from_diffusers

TOLERANCE = 1e-4


def our_unet(reference: UNet2DConditionModel) -> SD1UNet:
    config = unet_config_from_diffusers(dict(reference.config))  # pyright: ignore[reportUnknownArgumentType]
    ours = SD1UNet(config, device="meta").to_empty(device="cpu").eval()
    load_state_dict_checked(ours, reference.state_dict(), source="reference", mapping=diffusers_unet_mapping(config))
    return ours


def reference_output(
    unet: UNet2DConditionModel, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, **freeu: float
) -> torch.Tensor:
    if freeu:
        unet.enable_freeu(**freeu)
    try:
        with torch.no_grad():
            return unet(x, timestep, encoder_hidden_states=text).sample  # pyright: ignore[reportUnknownMemberType]
    finally:
        unet.disable_freeu()


def our_output(unet: SD1UNet, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    with torch.no_grad():
        return unet(x)


def test_freeu_matches_diffusers_enable_freeu_on_the_published_sd15_unet() -> None:
    # 32x32 latents: the first two decoder levels run at 4x4 and 8x8, where the 2x2 low-frequency window of the
    # Fourier filter covers part of the spectrum only.
    torch.manual_seed(1)
    x, text, timestep = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor([999])
    reference = random_diffusers_unet(SD15_UNET_CONFIG)
    expected = reference_output(reference, x, timestep, text, **SD15_SCALES)
    without_freeu = reference_output(reference, x, timestep, text)
    ours = our_unet(reference)
    del reference
    gc.collect()  # a full UNet is 3.4 GB in float32: keep one at a time

    before = our_output(ours, x, timestep, text)
    freeu = FreeU(ours).inject()
    assert len(freeu.adapters) == 6  # two levels of three skip connections each
    assert_relative_close(our_output(ours, x, timestep, text), expected, TOLERANCE)
    assert relative_error(without_freeu, expected) > 100 * TOLERANCE, "FreeU barely changes the reference: a weak test"
    freeu.eject()
    assert torch.equal(our_output(ours, x, timestep, text), before)


@pytest.fixture(scope="module")
def small_reference() -> UNet2DConditionModel:
    return random_diffusers_unet(SMALL_UNET_CONFIG)


@pytest.fixture(scope="module")
def small_unet(small_reference: UNet2DConditionModel) -> SD1UNet:
    return our_unet(small_reference)


@pytest.mark.parametrize(
    "size, scales",
    [
        ((16, 16), SD15_SCALES),
        ((32, 24), {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.3}),  # SD2.1's recommended factors
        ((13, 7), SD15_SCALES),  # odd sizes: 4x2 then 7x4 in the first two decoder levels
        ((8, 8), {"s1": 1.5, "s2": 0.5, "b1": 0.5, "b2": 2.0}),  # 2x2 then 4x4
    ],
)
def test_small_unet_with_freeu_matches_diffusers(
    small_reference: UNet2DConditionModel, small_unet: SD1UNet, size: tuple[int, int], scales: dict[str, float]
) -> None:
    torch.manual_seed(2)
    x, text, timestep = torch.randn(2, 4, *size), torch.randn(2, 77, 24), torch.tensor([500])
    freeu = FreeU(small_unet, **scales).inject()
    try:
        ours = our_output(small_unet, x, timestep, text)
    finally:
        freeu.eject()
    expected = reference_output(small_reference, x, timestep, text, **scales)
    without = reference_output(small_reference, x, timestep, text)
    assert_relative_close(ours, expected, TOLERANCE)
    assert relative_error(without, expected) > 100 * TOLERANCE, "FreeU barely changes the reference: a weak test"


def test_changed_scales_apply_while_injected(small_reference: UNet2DConditionModel, small_unet: SD1UNet) -> None:
    torch.manual_seed(3)
    x, text, timestep = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 24), torch.tensor([10])
    freeu = FreeU(small_unet).inject()
    try:
        freeu.set_scales(s2=0.5, b1=1.4)
        assert freeu.scales == {"s1": 0.9, "b1": 1.4, "s2": 0.5, "b2": 1.4}
        ours = our_output(small_unet, x, timestep, text)
    finally:
        freeu.eject()
    scales = {"s1": 0.9, "s2": 0.5, "b1": 1.4, "b2": 1.4}
    expected = reference_output(small_reference, x, timestep, text, **scales)
    without = reference_output(small_reference, x, timestep, text)
    assert_relative_close(ours, expected, TOLERANCE)
    assert relative_error(without, expected) > 100 * TOLERANCE, "FreeU barely changes the reference: a weak test"


def test_eject_restores_outputs_state_dict_and_layers_exactly(small_unet: SD1UNet) -> None:
    torch.manual_seed(4)
    x, text, timestep = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 24), torch.tensor([700])
    before = our_output(small_unet, x, timestep, text)
    state_dict = {key: value.clone() for key, value in small_unet.state_dict().items()}
    skips = list(small_unet.layers(ConcatenateSkip))

    freeu = FreeU(small_unet).inject()
    assert freeu.is_injected
    assert list(small_unet.state_dict()) == list(state_dict)  # no weights, and no layer path changes
    assert not torch.equal(our_output(small_unet, x, timestep, text), before)
    freeu.eject()

    assert not freeu.is_injected
    assert not list(small_unet.layers(FreeUAdapter)) and not list(small_unet.layers(FourierFilter))
    assert all(a is b for a, b in zip(small_unet.layers(ConcatenateSkip), skips, strict=True))
    assert small_unet.state_dict().keys() == state_dict.keys()
    assert all(torch.equal(value, state_dict[key]) for key, value in small_unet.state_dict().items())
    assert torch.equal(our_output(small_unet, x, timestep, text), before)


def test_inject_twice_fails_and_leaves_the_unet_unchanged(small_unet: SD1UNet) -> None:
    freeu = FreeU(small_unet).inject()
    try:
        injected = list(small_unet.layers(FreeUAdapter))
        with pytest.raises(fl.AdapterError, match="already injected"):
            freeu.inject()
        assert list(small_unet.layers(FreeUAdapter)) == injected
    finally:
        freeu.eject()
    with pytest.raises(fl.AdapterError, match="not injected"):
        freeu.eject()


def test_freeu_applies_to_the_first_two_decoder_levels_only(small_unet: SD1UNet) -> None:
    freeu = FreeU(small_unet)
    stages = list(small_unet.ensure_find(UpBlocks))
    assert [adapter.target for adapter in freeu.adapters] == [stage.ConcatenateSkip for stage in stages[:6]]  # pyright: ignore[reportUnknownMemberType, reportAttributeAccessIssue]
    assert [len(level) for level in freeu.levels] == [3, 3]


def test_freeu_rejects_what_is_not_an_sd1_unet() -> None:
    with pytest.raises(TypeError, match=r"a Stable Diffusion UNet \(SD1UNet, SDXLUNet\)"):
        FreeU(fl.Chain(fl.Identity()))  # type: ignore[arg-type]


def test_fourier_filter_scales_the_lowest_frequencies_only() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(FourierFilter(1.0)(x), x, atol=1e-6)
    constant = torch.ones(1, 1, 8, 8)  # only the zero frequency
    assert torch.allclose(FourierFilter(0.25)(constant), 0.25 * constant, atol=1e-6)
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # the highest frequency
    assert torch.allclose(FourierFilter(0.25)(checkerboard[None, None]), checkerboard[None, None], atol=1e-6)
    two_by_two = torch.randn(1, 2, 2, 2)  # the window covers the whole spectrum
    assert torch.allclose(FourierFilter(0.5)(two_by_two), 0.5 * two_by_two, atol=1e-6)
    assert FourierFilter(0.5)(x.half()).dtype == torch.float16


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({"s1": float("nan")}, "FreeU s1 must be a finite number, got nan"),
        ({"b2": float("inf")}, "FreeU b2 must be a finite number, got inf"),
        ({"s2": float("-inf"), "b1": 1.0}, "FreeU s2 must be a finite number"),
        ({"b1": "strong"}, "FreeU b1 must be a finite number, got 'strong'"),
    ],
)
def test_factors_that_are_not_finite_are_refused_and_change_nothing(
    small_unet: SD1UNet, scales: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FreeU(small_unet, **scales)
    freeu = FreeU(small_unet)
    with pytest.raises(ValueError, match=message):
        freeu.set_scales(**scales)
    assert freeu.scales == SD15_SCALES
