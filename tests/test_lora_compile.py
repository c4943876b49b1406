"""`torch.compile` of a SD1UNet with LoRAs loaded by `LoraManager`: one graph, and `set_scale` needs no recompile.

A LoRA's scale lives in a buffer that `set_scale` updates in place, so the compiled graph reads the new value
(a Python float attribute would be a guard: the first scale change would recompile). `fullgraph=True` makes any
graph break an error; the `eager` backend runs the captured graph op by op, so compiled and eager outputs agree
within 1e-6 of max |eager|. A small UNet goes through the code paths of SD1.5; LoRAs patch its linear layers
(attention projections, feed-forward, time embedding) and its convolutions (LoCon, 1x1 and 3x3 kernels), a second
LoRA stacks on the linear layers. The
published SD1.5 UNet with a LoRA on every such layer, checked by hand with `torch._dynamo.explain`, also gives one
graph and 0 graph breaks. With hot-swap slots declared before compiling (`LoraManager.enable_hotswap`), adding,
removing and replacing LoRAs runs under `fail_on_recompile` too (checked by hand with the default inductor backend
on a small Chain as well).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_core.testing import assert_relative_close, fail_on_recompile, relative_error
from refiners_lora import LoraManager
from refiners_sd15 import SD1UNet
from refiners_sd15.testing import small_compile_unet

TOLERANCE = 1e-6
RANK = 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # refiners_core.testing's fixture


def small_unet() -> SD1UNet:
    unet = small_compile_unet()
    unet.set_timestep(torch.tensor([500]))
    unet.set_clip_text_embedding(torch.randn(2, 7, 24))
    return unet


def random_lora(unet: SD1UNet, seed: int, convolutions: bool = True) -> dict[str, torch.Tensor]:
    """A LoRA in our own format (`<layer path>.down.weight` / `.up.weight`) on every Linear (and Conv2d)."""
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for path, layer in unet.named_modules():
        if isinstance(layer, fl.Linear):
            down_shape, up_shape = (RANK, layer.in_features), (layer.out_features, RANK)
        elif isinstance(layer, fl.Conv2d) and convolutions:
            down_shape, up_shape = (RANK, layer.in_channels, *layer.kernel_size), (layer.out_channels, RANK, 1, 1)
        else:
            continue
        lora[f"{path}.down.weight"] = torch.randn(down_shape, generator=generator) / down_shape[1] ** 0.5
        lora[f"{path}.up.weight"] = torch.randn(up_shape, generator=generator) / RANK**0.5
    return lora


def test_lora_unet_compiles_without_graph_break_and_set_scale_needs_no_recompile() -> None:
    unet = small_unet()
    state_dict_keys = set(unet.state_dict())
    first, second = random_lora(unet, seed=1), random_lora(unet, seed=2, convolutions=False)
    loras = LoraManager(unet)
    loras.add("first", first, scale=1.0)
    loras.add("second", second, scale=0.5)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")  # raises on a graph break
    with torch.no_grad():
        before = compiled(x)
        assert_relative_close(before, unet(x), TOLERANCE)
        loras.set_scale("first", 0.25)
        with torch.compiler.set_stance("fail_on_recompile"):
            after = compiled(x)
        expected = unet(x)
    assert_relative_close(after, expected, TOLERANCE)
    assert not torch.allclose(after, before), "the new scale must reach the compiled graph"
    loras.remove("first")
    loras.remove("second")
    assert set(unet.state_dict()) == state_dict_keys, "the scale buffers are not part of any state_dict"


def test_hotswap_adds_removes_and_replaces_loras_in_a_compiled_unet_without_recompiling(tmp_path: Path) -> None:
    """Two slots of rank 4 on every sixth Linear and Conv2d (all would do; fewer keep the compilation short),
    declared before compiling; each state of the compiled UNet equals (1e-5) a fresh UNet with the same LoRAs loaded
    the usual way, uncompiled."""
    unet = small_unet()
    layers = [path for path, layer in unet.named_modules() if isinstance(layer, (fl.Linear, fl.Conv2d))][::6]
    assert any(isinstance(unet.get_submodule(path), fl.Conv2d) for path in layers), "LoCon slots are covered"

    def lora(seed: int, rank: int = RANK) -> dict[str, torch.Tensor]:
        tensors = random_lora(unet, seed=seed)
        return {
            key: (value[:rank] if key.endswith(".down.weight") else value[:, :rank]).contiguous()
            for key, value in tensors.items()
            if key.rpartition(".")[0].rpartition(".")[0] in layers
        }

    first, second, third = lora(seed=1), lora(seed=2), lora(seed=3, rank=2)
    third_path = tmp_path / "third.safetensors"
    save_file(third, third_path)
    loras = LoraManager(unet)
    loras.enable_hotswap(max_rank=RANK, max_loras=2, layers=layers)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")

    def expected(*added: tuple[dict[str, torch.Tensor], float]) -> torch.Tensor:
        fresh = small_unet()
        for index, (lora, scale) in enumerate(added):
            LoraManager(fresh).add(f"lora-{index}", lora, scale=scale)
        return fresh(x)

    with torch.no_grad():
        plain = compiled(x)
        assert_relative_close(plain, expected(), 1e-5)
        with fail_on_recompile():
            loras.add("first", first, scale=0.5)
            with_first = compiled(x)
            assert relative_error(with_first, plain) > 1e-2, "the LoRA reaches the compiled graph"
            assert_relative_close(with_first, expected((first, 0.5)), 1e-5)
            loras.add("second", second)
            assert_relative_close(compiled(x), expected((first, 0.5), (second, 1.0)), 1e-5)
            loras.remove("first")
            assert_relative_close(compiled(x), expected((second, 1.0)), 1e-5)
            loras.replace("second", third_path, scale=0.75)  # a rank-2 LoRA in a rank-4 slot
            assert_relative_close(compiled(x), expected((third, 0.75)), 1e-5)
            loras.set_scale("second", 0.25)
            assert_relative_close(compiled(x), expected((third, 0.25)), 1e-5)
            loras.remove("second")
            assert_relative_close(compiled(x), plain, 1e-6)
