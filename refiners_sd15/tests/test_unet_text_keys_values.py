"""The cross-attentions' text keys and values, computed once per text embedding and reused while still valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.testing import assert_bitwise_equal
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import small_compile_unet
from refiners_sd15.unet.blocks import CrossAttention

LATENTS = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))


def step(unet: SD1UNet, text: torch.Tensor, latents: torch.Tensor = LATENTS) -> torch.Tensor:
    unet.set_timestep(torch.tensor([500]))
    unet.set_clip_text_embedding(text)
    return unet(latents)


def uncached(unet: SD1UNet, text: torch.Tensor) -> torch.Tensor:
    """The step computed on the chain's own path (gradients on: no reuse), detached."""
    with torch.enable_grad():
        return step(unet, text).detach()


def key_calls(unet: SD1UNet) -> list[int]:
    """A counter of calls to the key projections of the cross-attentions."""
    calls = [0]
    for attention in unet.layers(CrossAttention):
        parts = attention.reusable_parts()
        assert parts is not None
        parts[2].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_keys_and_values_are_reused_for_the_same_text_and_give_the_same_outputs() -> None:
    unet = small_compile_unet()
    calls = key_calls(unet)
    with torch.no_grad():
        first = step(unet, TEXT)
        computed = calls[0]
        second = step(unet, TEXT.clone(), LATENTS * 0.5)  # an equal text in another tensor is the same text
        assert calls[0] == computed > 0
        third = step(unet, TEXT)
    assert_bitwise_equal(first, uncached(unet, TEXT))
    assert_bitwise_equal(third, first)
    assert_bitwise_equal(second, uncached_step(unet, TEXT, LATENTS * 0.5))


def uncached_step(unet: SD1UNet, text: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return step(unet, text, latents).detach()


def test_a_text_changed_in_place_under_inference_mode_is_seen() -> None:
    unet = small_compile_unet()
    with torch.inference_mode():
        text = TEXT.clone()
        step(unet, text)
        text.mul_(2.0)  # an inference tensor: no version counter, the copy comparison sees it
        changed = step(unet, text)
    assert_bitwise_equal(changed, uncached(unet, TEXT * 2.0))


def test_a_projection_weight_changed_in_place_or_moved_recomputes_the_keys() -> None:
    unet = small_compile_unet()
    attention = next(unet.layers(CrossAttention))
    parts = attention.reusable_parts()
    assert parts is not None and isinstance(key := parts[2], fl.Linear)
    with torch.no_grad():
        step(unet, TEXT)
        key.weight.add_(0.5)  # as a LoRA fused into the key projection
        fused = step(unet, TEXT)
    assert_bitwise_equal(fused, uncached(unet, TEXT))
    unet.to(torch.float64)
    with torch.no_grad():
        moved = step(unet, TEXT.double(), LATENTS.double())
    with torch.enable_grad():
        expected = step(unet, TEXT.double(), LATENTS.double()).detach()
    assert moved.dtype == torch.float64
    assert_bitwise_equal(moved, expected)


def test_an_adapted_projection_runs_through_the_chain_and_drops_the_cache() -> None:
    unet = small_compile_unet()
    attention = next(unet.layers(CrossAttention))
    with torch.no_grad():
        step(unet, TEXT)
        assert attention.text_keys_values is not None
        distribute = attention.ensure_find(fl.Distribute)
        key = distribute[1]
        distribute.replace(key, fl.Chain(key, fl.Multiply(2.0)))  # stands for an adapter on the key projection
        adapted = step(unet, TEXT)
        assert attention.reusable_parts() is None and attention.text_keys_values is None
    assert_bitwise_equal(adapted, uncached(unet, TEXT))


def test_inference_mode_weights_are_not_cached() -> None:
    with torch.inference_mode():
        unet = small_compile_unet()
        step(unet, TEXT)
        assert all(attention.text_keys_values is None for attention in unet.layers(CrossAttention))


def test_with_gradients_on_nothing_is_cached_and_gradients_reach_the_key_projection() -> None:
    unet = small_compile_unet()
    step(unet, TEXT).sum().backward()
    attention = next(unet.layers(CrossAttention))
    parts = attention.reusable_parts()
    assert parts is not None and parts[2].weight.grad is not None
    assert attention.text_keys_values is None


@pytest.mark.parametrize("mmap", [False, True], ids=["copy", "mmap"])
def test_a_unet_loaded_under_inference_mode_reuses_and_sees_weights_changed_in_place(
    tmp_path: Path, mmap: bool
) -> None:
    """`from_pretrained` under inference mode gives normal tensors: their version counters let the reuse run and
    see a change made in place under inference mode (as a LoRA fused there)."""
    path = tmp_path / "unet.safetensors"
    small_compile_unet().save(path)
    with torch.inference_mode():
        unet = SD1UNet.from_pretrained(path, mmap=mmap)
        assert not any(t.is_inference() for t in (*unet.parameters(), *unet.buffers()))
        calls = key_calls(unet)
        first = step(unet, TEXT)
        computed = calls[0]
        again = step(unet, TEXT)
        assert calls[0] == computed > 0, "the keys were computed again for the same text and weights"
        assert all(attention.text_keys_values is not None for attention in unet.layers(CrossAttention))
        parts = next(unet.layers(CrossAttention)).reusable_parts()
        assert parts is not None and isinstance(value := parts[3], fl.Linear)
        value.weight.mul_(0.5)  # the value projection, in place under inference mode
        changed = step(unet, TEXT)
    assert_bitwise_equal(again, first)
    assert_bitwise_equal(changed, uncached(unet, TEXT))
    assert not torch.equal(changed, first)
