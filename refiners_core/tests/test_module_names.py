"""`refiners_core.module_names`: the `ForeignModuleNames` protocol and the helpers that build its mappings."""

from __future__ import annotations

import pytest

import refiners_core.fluxion as fl
from refiners_core import ForeignModuleNames
from refiners_core.module_names import DIFFUSERS, KOHYA, kohya_names, module_names, prefixed


class Named(fl.Chain):
    def __init__(self) -> None:
        super().__init__(fl.Linear(2, 2))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        return {"proj": "Linear"} if convention == DIFFUSERS else {}


def test_a_model_with_the_method_implements_the_protocol_and_a_plain_chain_does_not() -> None:
    assert isinstance(Named(), ForeignModuleNames)
    assert not isinstance(fl.Chain(fl.Linear(2, 2)), ForeignModuleNames)
    assert Named().foreign_module_names(KOHYA) == {}


def test_module_names_strip_weight_and_bias_and_skip_buffers() -> None:
    mapping = {
        "down.0.conv.weight": "Down.Chain_1.Conv2d.weight",
        "down.0.conv.bias": "Down.Chain_1.Conv2d.bias",
        "attn.to_q.weight": "Attention.Linear_1.weight",
        "embeddings.position_ids": "Sum.PositionalEncoder.position_ids",
    }
    assert module_names(mapping) == {"down.0.conv": "Down.Chain_1.Conv2d", "attn.to_q": "Attention.Linear_1"}


def test_module_names_refuse_a_module_split_over_two_layers() -> None:
    with pytest.raises(ValueError, match=r"'proj' maps to two layers: `A` and `B`"):
        module_names({"proj.weight": "A.weight", "proj.bias": "B.bias"})


def test_kohya_names_flatten_diffusers_paths_under_a_prefix() -> None:
    names = {"down_blocks.0.attentions.0.proj_in": "Down.Linear_1", "to_out.0": "Linear"}
    assert kohya_names(names, "lora_unet_") == {
        "lora_unet_down_blocks_0_attentions_0_proj_in": "Down.Linear_1",
        "lora_unet_to_out_0": "Linear",
    }
    with pytest.raises(ValueError, match="lora_a_b"):
        kohya_names({"a.b": "X", "a_b": "Y"}, "lora_")


def test_prefixed_prefixes_both_sides() -> None:
    assert prefixed({"conv_in": "Conv2d"}, "unet.", "unet.") == {"unet.conv_in": "unet.Conv2d"}
