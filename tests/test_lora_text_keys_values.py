"""LoRAs on the cross-attentions' key and value projections: the text's keys and values are still computed once and
reused (a `LoraAdapter` is pure, `refiners_core.fluxion.is_pure`), and a change of the LoRA (its weights, its scale,
fusing it, removing it) computes them again; the outputs are those of the chain's own path to the last bit."""

from __future__ import annotations

from collections.abc import Iterator

import torch

import refiners_core.fluxion as fl
from refiners_core.testing import assert_bitwise_equal
from refiners_lora import LoraManager
from refiners_lora.adapter import LoraAdapter
from refiners_lora.testing import randomize_loras
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import small_compile_unet
from refiners_sd15.unet.blocks import CrossAttention

LATENTS = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))


def step(unet: SD1UNet) -> torch.Tensor:
    unet.set_timestep(torch.tensor([500]))
    unet.set_clip_text_embedding(TEXT)
    return unet(LATENTS)


def uncached(unet: SD1UNet) -> torch.Tensor:
    """The step on the chain's own path (gradients on: no reuse), detached."""
    with torch.enable_grad():
        return step(unet).detach()


def key_value_projections(unet: SD1UNet) -> Iterator[fl.Linear]:
    for attention in unet.layers(CrossAttention):
        distribute = attention.ensure_find(fl.Distribute)
        for layer in tuple(distribute)[1:]:
            assert isinstance(layer, fl.Linear)
            yield layer


def lora_unet() -> tuple[SD1UNet, list[LoraAdapter]]:
    """A small UNet with a rank-2 LoRA on every cross-attention key and value projection."""
    unet = small_compile_unet()
    adapters = [LoraAdapter(layer, rank=2) for layer in list(key_value_projections(unet))]
    for adapter in adapters:
        adapter.inject()
    randomize_loras(adapters, seed=3, std=0.2)
    return unet, adapters


def cached_entries(unet: SD1UNet) -> list[object]:
    return [attention.text_keys_values for attention in unet.layers(CrossAttention)]


def test_keys_and_values_through_a_lora_are_reused_and_match_the_chain() -> None:
    unet, _ = lora_unet()
    with torch.no_grad():
        first = step(unet)
        entries = cached_entries(unet)
        again = step(unet)
    assert entries and all(entry is not None for entry in entries)
    assert all(a is b for a, b in zip(cached_entries(unet), entries, strict=True)), "computed again"
    assert_bitwise_equal(first, uncached(unet))
    assert_bitwise_equal(again, first)


def test_a_lora_changed_in_place_rescaled_or_ejected_computes_them_again() -> None:
    unet, adapters = lora_unet()
    with torch.no_grad():
        step(unet)
        adapters[0].lora.up.weight.mul_(3.0)
        changed = step(unet)
    assert_bitwise_equal(changed, uncached(unet))
    with torch.no_grad():
        adapters[1].scale = 0.25
        rescaled = step(unet)
    assert_bitwise_equal(rescaled, uncached(unet))
    for adapter in adapters:
        adapter.eject()
    with torch.no_grad():
        plain = step(unet)
    assert_bitwise_equal(plain, uncached(unet))
    assert not torch.equal(plain, rescaled)


def key_value_lora(unet: SD1UNet) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA state dict (our keys) on every cross-attention key and value projection of `unet`."""
    generator = torch.Generator().manual_seed(4)
    return {
        f"{layer.get_path(unet)}.{name}": torch.randn(shape, generator=generator) * 0.3
        for layer in key_value_projections(unet)
        for name, shape in (("down.weight", (2, layer.in_features)), ("up.weight", (layer.out_features, 2)))
    }


def test_a_lora_added_and_rescaled_under_inference_mode_keeps_the_reuse_and_is_seen() -> None:
    unet = small_compile_unet()
    with torch.inference_mode():
        manager = LoraManager(unet)
        manager.add("style", key_value_lora(unet))
        first = step(unet)
        entries = cached_entries(unet)
        step(unet)
        assert all(entry is not None for entry in entries)
        assert all(a is b for a, b in zip(cached_entries(unet), entries, strict=True)), "computed again"
        manager.set_scale("style", 0.5)
        rescaled = step(unet)
    assert_bitwise_equal(first, uncached_at_scale(unet, scale=1.0, manager=manager))
    assert_bitwise_equal(rescaled, uncached_at_scale(unet, scale=0.5, manager=manager))


def uncached_at_scale(unet: SD1UNet, *, scale: float, manager: LoraManager) -> torch.Tensor:
    manager.set_scale("style", scale)
    return uncached(unet)


def test_fusing_and_unfusing_a_lora_of_a_manager_computes_them_again() -> None:
    unet = small_compile_unet()
    with torch.no_grad():
        plain = step(unet)
    manager = LoraManager(unet)
    manager.add("style", key_value_lora(unet))
    with torch.no_grad():
        unfused = step(unet)
        manager.fuse()
        fused = step(unet)
        manager.unfuse()
        unfused_again = step(unet)
        manager.remove("style")
        plain_again = step(unet)
    assert not torch.equal(unfused, plain)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert_bitwise_equal(unfused_again, unfused)
    assert_bitwise_equal(plain_again, plain)
