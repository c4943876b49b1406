"""Per-block scales of one LoRA (`LoraManager.set_scale` with a diffusers-style dict or an A1111 block-weight list)
on a core-only model that tells the block of each layer (`refiners_core.layer_blocks.LayerBlocks`): which layer
takes which value, and every bad input refused in one line naming the key, with no scale changed.

Parity with diffusers' `set_adapters` and the extension's block numbering on SD1.5 and SDXL is tested in the
repository's tests/test_lora_block_weights.py (it needs refiners-sd15 and diffusers).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.layer_blocks import LayerBlock
from refiners_core.testing import assert_relative_close, relative_error
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.block_weights import block_weight_names

BLOCKS = [
    LayerBlock("text_encoder"),
    LayerBlock("unet", "in"),
    LayerBlock("unet", "down", 0, 0, "resnet"),
    LayerBlock("unet", "down", 0, 0, "attention"),
    LayerBlock("unet", "down", 0, 1, "attention"),
    LayerBlock("unet", "down", 0, 0, "sampler"),
    LayerBlock("unet", "down", 1, 0, "resnet"),  # a level without transformers
    LayerBlock("unet", "mid", None, 0, "resnet"),
    LayerBlock("unet", "mid", None, 0, "attention"),
    LayerBlock("unet", "up", 0, 0, "attention"),
    LayerBlock("unet", "up", 0, 1, "resnet"),
    LayerBlock("unet", "up", 0, 1, "attention"),
    LayerBlock("unet", "up", 0, 2, "attention"),
    LayerBlock("unet", "up", 0, 0, "sampler"),
    LayerBlock("unet", "out"),
]


class Tiny(fl.Chain):
    """One Linear per block of `BLOCKS`; `layer_blocks` is the `LayerBlocks` protocol."""

    def __init__(self) -> None:
        super().__init__(*(fl.Linear(4, 4) for _ in BLOCKS))

    def layer_blocks(self) -> dict[str, LayerBlock]:
        return {f"Linear_{i + 1}": block for i, block in enumerate(BLOCKS)}


def loaded() -> tuple[Tiny, LoraManager]:
    torch.manual_seed(0)
    model = Tiny()
    loras = LoraManager(model)
    loras.create("style", [f"Linear_{i + 1}" for i in range(len(BLOCKS))], rank=2, alpha=4.0)  # alpha / rank = 2
    return model, loras


def multipliers(loras: LoraManager) -> list[float]:
    return [adapter.scale / 2 for adapter in loras._get("style").adapters]  # pyright: ignore[reportPrivateUsage]


def test_a_diffusers_dict_scales_transformers_and_the_layers_sharing_their_index() -> None:
    _, loras = loaded()
    loras.set_scale("style", {"unet": {"down": [0.5, 0.25], "mid": 3.0, "up": [4.0, 5.0, 6.0]}, "text_encoder": 0.8})
    assert multipliers(loras) == pytest.approx(
        [0.8, 1.0, 0.5, 0.5, 0.25, 0.5, 1.0, 1.0, 3.0, 4.0, 5.0, 5.0, 6.0, 4.0, 1.0]
    )
    loras.set_scale("style", {"unet": {"up": {"block_0": 7.0}}})
    assert multipliers(loras) == pytest.approx([1.0] * 9 + [7.0] * 5 + [1.0])
    loras.set_scale("style", {"unet": 0.5})
    assert multipliers(loras) == [1.0] + [0.5] * 14
    loras.set_scale("style", 2.0)
    assert multipliers(loras) == [2.0] * 15
    assert loras.scale("style") == 2.0


def test_a_block_weight_list_in_full_or_short_form() -> None:
    model, loras = loaded()
    full = block_weight_names(model)
    assert full == ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "M00", "OUT00", "OUT01", "OUT02"]
    assert block_weight_names(model, short=True) == ["BASE", "IN01", "IN02", "M00", "OUT00", "OUT01", "OUT02"]
    loras.set_scale("style", [float(i) for i in range(10)])
    assert multipliers(loras) == pytest.approx(
        [0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 7.0, 8.0, 8.0, 9.0, 9.0, 1.0]
    )
    with pytest.raises(ValueError, match=r"^LoRA 'style': layer `Linear_2` is in block IN00, which the 7-value list"):
        loras.set_scale("style", [0.0] * 7)
    loras.remove("style")
    loras.create("style", ["Linear_1", "Linear_4", "Linear_9", "Linear_13"], rank=2, alpha=4.0)
    loras.set_scale("style", [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    assert multipliers(loras) == pytest.approx([0.5, 1.5, 3.5, 6.5])


def test_a_block_weight_preset_name_gives_its_blocks_their_value_and_the_others_zero() -> None:
    _, loras = loaded()
    loras.set_scale("style", "INS")  # BASE, IN01, IN02 and IN04 at 1 (IN03, a downsampler, is not in its 17 values)
    assert multipliers(loras) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert loras.scale("style") == "INS"
    loras.set_scale("style", "ALL0.5")
    assert multipliers(loras) == [0.5, 0.0, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        ({"unet": 1.0, "vae": 0.5}, ValueError, "unknown component 'vae'"),
        ({"unet": {"middle": 1.0}}, ValueError, "unknown UNet section 'unet.middle'"),
        ({"unet": {"down": {"block_1": 1.0}}}, ValueError, r"unknown block 'unet.down.block_1' .* \['block_0'\]"),
        ({"unet": {"up": [1.0, 2.0]}}, ValueError, r"'unet.up.block_0' takes 3 scales .* got 2"),
        ({"unet": {"mid": [1.0, 2.0]}}, ValueError, "'unet.mid' takes one scale, got a list of 2"),
        ({"unet": {"down": [1.0, float("nan")]}}, ValueError, r"'unet.down.block_0'\[1\] must be a finite number"),
        ({"text_encoder": "high"}, TypeError, "text_encoder must be a number"),
        ({"text_encoder": {"down": 1.0}}, TypeError, "text_encoder must be a number"),
        ([1.0] * 8, ValueError, r"a block-weight list of 8 values; this model takes 7 \(BASE, .*\) or 10"),
        ([1.0] * 9 + [float("inf")], ValueError, r"block weight OUT02 \(position 9\) must be a finite number"),
        ("strong", ValueError, r"unknown block-weight preset 'strong' \(known: NONE, ALL, INS, .*, ALL0.5\)$"),
        ("all", ValueError, r"unknown block-weight preset 'all' \(known: NONE, ALL, "),
    ],
)
def test_bad_block_scales_are_refused_naming_the_key_and_nothing_changes(
    scale: Any, error: type[Exception], message: str
) -> None:
    _, loras = loaded()
    loras.set_scale("style", {"unet": {"down": 0.5}})
    before = multipliers(loras)
    with pytest.raises(error, match=message) as raised:
        loras.set_scale("style", scale)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("LoRA 'style': ")
    assert multipliers(loras) == before
    assert loras.scale("style") == {"unet": {"down": 0.5}}


def test_block_scales_need_a_model_that_tells_its_blocks() -> None:
    torch.manual_seed(0)
    model = fl.Chain(fl.Linear(4, 4))
    loras = LoraManager(model)
    loras.create("style", ["Linear"], rank=2)
    with pytest.raises(TypeError, match=r"Chain does not$"):
        loras.set_scale("style", {"unet": 0.5})
    assert loras.scale("style") == 1.0


def test_fusing_keeps_the_block_scales() -> None:
    model, loras = loaded()
    with torch.no_grad():
        for adapter in loras._get("style").adapters:  # pyright: ignore[reportPrivateUsage]
            assert isinstance(adapter, LoraAdapter)  # a plain LoRA file
            torch.nn.init.normal_(adapter.lora.up.weight)
    x = torch.randn(3, 4)
    with torch.no_grad():
        plain = model(x)
        loras.set_scale("style", [float(i) / 4 for i in range(10)])
        unfused = model(x)
        loras.fuse()
        fused = model(x)
        loras.unfuse()
    assert relative_error(unfused, plain) > 1e-2, "the block scales change the output"
    assert_relative_close(fused, unfused, 1e-5)
