"""`LoraManager` on models that know nothing of LoRA files: our own format on any Chain, a third-party model that
names its layers through `ForeignModuleNames`, scales, removal, fusing, and every bad input left without effect.

Expected outputs are computed from the weights fused by hand (`W + scale * alpha / rank * up @ down`), in float32,
within 1e-4 of the largest reference value; "exactly" means bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS, KOHYA, ForeignModuleNames
from refiners_core.testing import assert_relative_close, state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.testing import ConvAndLinears, assert_lora_free

Snapshot = dict[str, torch.Tensor]


class Block(ConvAndLinears):
    """The convolution and two Linears of `ConvAndLinears`."""


def model() -> Block:
    torch.manual_seed(0)
    return Block()


def own_lora(seed: int, rank: int = 2, alpha: float | None = 3.0) -> dict[str, torch.Tensor]:
    """A refiners-format LoRA on the conv (LoCon, 3x3 down) and both linears of `Block`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    tensors = {
        "Conv2d.down.weight": randn(rank, 3, 3, 3),
        "Conv2d.up.weight": randn(8, rank, 1, 1),
        "Linear_1.down.weight": randn(rank, 8),
        "Linear_1.up.weight": randn(16, rank),
        "Linear_2.down.weight": randn(rank, 16),
        "Linear_2.up.weight": randn(4, rank),
    }
    if alpha is not None:
        tensors |= {f"{layer}.alpha": torch.tensor(alpha) for layer in ("Conv2d", "Linear_1", "Linear_2")}
    return tensors


def fused_by_hand(base: Block, loras: list[tuple[dict[str, torch.Tensor], float]]) -> Block:
    """A copy of `base` with `W + scale * alpha / rank * up @ down` of every LoRA added to its weights."""
    fused = model()
    fused.load_state_dict(base.state_dict())
    with torch.no_grad():
        for tensors, scale in loras:
            for layer in ("Conv2d", "Linear_1", "Linear_2"):
                down, up = tensors[f"{layer}.down.weight"], tensors[f"{layer}.up.weight"]
                rank = down.shape[0]
                alpha = float(tensors[f"{layer}.alpha"]) if f"{layer}.alpha" in tensors else rank
                delta = torch.einsum("or,r...->o...", up.flatten(1), down)
                weight = fused[layer].weight
                assert isinstance(weight, torch.Tensor)
                weight.add_(scale * alpha / rank * delta)
    return fused


TOLERANCE = 1e-4
"""Relative to max |reference|: the LoRA deltas are of the order of the weights, so are rounding errors."""


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_own_format_loads_onto_any_chain_and_matches_weights_fused_by_hand() -> None:
    net = model()
    expected = fused_by_hand(net, [(own_lora(1), 0.7)])(X)
    assert LoraManager(net).add("style", own_lora(1), scale=0.7) == []
    assert not isinstance(net, ForeignModuleNames)
    assert {type(net[path]) for path in ("Conv2d", "Linear_1", "Linear_2")} == {LoraAdapter}
    assert_relative_close(net(X), expected, TOLERANCE)


def test_a_missing_alpha_means_alpha_equals_rank() -> None:
    net = model()
    expected = fused_by_hand(net, [(own_lora(1, alpha=None), 1.0)])(X)
    LoraManager(net).add("style", own_lora(1, alpha=None))
    assert_relative_close(net(X), expected, TOLERANCE)


def test_set_scale_rescales_without_reading_the_file_again(tmp_path: Path) -> None:
    net = model()
    path = tmp_path / "style.safetensors"
    save_file(own_lora(1), path)
    loras = LoraManager(net)
    loras.add("style", path)
    path.unlink()
    for scale in (0.25, -1.5, 0.0):
        loras.set_scale("style", scale)
        assert loras.scale("style") == scale
        assert_relative_close(net(X), fused_by_hand(model(), [(own_lora(1), scale)])(X), TOLERANCE)


def test_remove_restores_the_state_dict_and_outputs_exactly() -> None:
    net = model()
    before, expected = state_snapshot(net), net(X)
    loras = LoraManager(net)
    loras.add("style", own_lora(1))
    assert not torch.allclose(net(X), expected)
    loras.remove("style")
    assert_lora_free(net, before)
    assert torch.equal(net(X), expected)
    assert loras.names == ()


def test_two_loras_add_up_and_either_can_be_removed_first() -> None:
    for first_out in ("one", "two"):
        net = model()
        loras = LoraManager(net)
        loras.add("one", own_lora(1), scale=0.5)
        loras.add("two", own_lora(2, rank=3, alpha=1.0), scale=2.0)
        assert loras.names == ("one", "two")
        both = fused_by_hand(model(), [(own_lora(1), 0.5), (own_lora(2, rank=3, alpha=1.0), 2.0)])
        assert_relative_close(net(X), both(X), TOLERANCE)
        loras.set_scale("one", -1.0)  # stacked on the same layers as "two": each keeps its own scale
        both = fused_by_hand(model(), [(own_lora(1), -1.0), (own_lora(2, rank=3, alpha=1.0), 2.0)])
        assert_relative_close(net(X), both(X), TOLERANCE)
        loras.set_scale("one", 0.5)
        loras.remove(first_out)
        remaining = [(own_lora(2, rank=3, alpha=1.0), 2.0)] if first_out == "one" else [(own_lora(1), 0.5)]
        assert_relative_close(net(X), fused_by_hand(model(), remaining)(X), TOLERANCE)
        loras.remove(loras.names[0])
        assert_lora_free(net, state_snapshot(model()))


def test_managers_of_one_model_share_their_loras() -> None:
    net = model()
    LoraManager(net).add("style", own_lora(1))
    assert LoraManager(net).names == ("style",)
    assert LoraManager(model()).names == ()


def test_fuse_bakes_the_loras_in_and_unfuse_restores_the_weights_bit_for_bit() -> None:
    net = model()
    before = state_snapshot(net)
    loras = LoraManager(net)
    loras.add("one", own_lora(1), scale=0.5)
    loras.add("two", own_lora(2), scale=-1.0)
    unfused_state, unfused = state_snapshot(net), net(X)
    loras.fuse()
    assert loras.is_fused
    assert not any(isinstance(layer, LoraAdapter) for layer in net.modules())
    assert list(net.state_dict()) == list(before)
    assert_relative_close(net(X), unfused, TOLERANCE)
    loras.fuse()  # already fused: nothing changes
    assert_relative_close(net(X), unfused, TOLERANCE)
    loras.unfuse()
    assert not loras.is_fused
    assert_state = net.state_dict()
    assert list(assert_state) == list(unfused_state)
    assert all(torch.equal(assert_state[key], tensor) for key, tensor in unfused_state.items())
    assert torch.equal(net(X), unfused)
    loras.remove("one")
    loras.remove("two")
    assert_lora_free(net, before)


@pytest.mark.parametrize("action", ["add", "remove", "set_scale"])
def test_changing_loras_while_fused_raises_and_changes_nothing(action: str) -> None:
    net = model()
    loras = LoraManager(net)
    loras.add("style", own_lora(1))
    loras.fuse()
    fused = state_snapshot(net)
    with pytest.raises(RuntimeError, match=f"cannot {action} .*unfuse"):
        if action == "add":
            loras.add("other", own_lora(2))
        elif action == "remove":
            loras.remove("style")
        else:
            loras.set_scale("style", 0.5)
    assert loras.names == ("style",)
    assert all(torch.equal(net.state_dict()[key], tensor) for key, tensor in fused.items())


def test_a_key_that_matches_no_layer_is_named_and_nothing_is_applied() -> None:
    net = model()
    before = state_snapshot(net)
    tensors = own_lora(1) | {"Linear_9.down.weight": torch.randn(2, 8), "Linear_9.up.weight": torch.randn(16, 2)}
    with pytest.raises(WeightsError, match=r"2 key\(s\) match no layer of Block.*'Linear_9.down.weight'"):
        LoraManager(net).add("style", tensors)
    assert_lora_free(net, before)
    assert LoraManager(net).names == ()


def test_strict_false_loads_the_rest_and_returns_and_logs_the_exact_unmatched_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = model()
    extra = {"Linear_9.down.weight": torch.randn(2, 8), "Linear_9.up.weight": torch.randn(16, 2)}
    with caplog.at_level(logging.WARNING, logger="refiners_lora"):
        skipped = LoraManager(net).add("style", own_lora(1) | extra, strict=False)
    assert skipped == ["Linear_9.down.weight", "Linear_9.up.weight"]
    assert "Linear_9.down.weight" in caplog.text and "Linear_9.up.weight" in caplog.text
    assert_relative_close(net(X), fused_by_hand(model(), [(own_lora(1), 1.0)])(X), TOLERANCE)


def test_strict_false_still_refuses_a_file_that_matches_nothing() -> None:
    net = model()
    with pytest.raises(WeightsError, match="match no layer"):
        LoraManager(net).add("style", {"Nope.down.weight": torch.randn(2, 8), "Nope.up.weight": torch.randn(4, 2)})
    assert LoraManager(net).names == ()


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("Linear_2.down.weight", (2, 15), "(2, 16)"),
        ("Linear_2.up.weight", (4, 3), "(4, 2)"),
        ("Conv2d.down.weight", (2, 3, 1, 1), "(2, 3, 3, 3)"),
        ("Conv2d.up.weight", (8, 2, 3, 3), "(8, 2, 1, 1)"),
    ],
)
def test_a_shape_that_does_not_fit_names_key_layer_path_expected_and_found(
    key: str, shape: tuple[int, ...], expected: str
) -> None:
    net = model()
    before = state_snapshot(net)
    tensors = own_lora(1) | {key: torch.randn(*shape)}
    with pytest.raises(WeightsError) as error:
        LoraManager(net).add("style", tensors)
    message = str(error.value)
    layer = key.rsplit(".", 2)[0]
    assert f"'{key}' has shape {shape}" in message
    assert f"`Block.{layer}`" in message and f"expects {expected}" in message
    assert_lora_free(net, before)
    assert LoraManager(net).names == ()


def test_a_layer_other_than_linear_or_conv_is_refused() -> None:
    net = model()
    before = state_snapshot(net)
    with pytest.raises(WeightsError, match=r"`Block.LayerNorm`, a LayerNorm"):
        LoraManager(net).add(
            "style",
            own_lora(1) | {"LayerNorm.down.weight": torch.randn(2, 16), "LayerNorm.up.weight": torch.randn(16, 2)},
        )
    assert_lora_free(net, before)


def test_down_weights_without_up_weights_are_refused() -> None:
    net = model()
    tensors = own_lora(1)
    del tensors["Linear_2.up.weight"]
    with pytest.raises(WeightsError, match=r"'Linear_2.down.weight' has no up weights"):
        LoraManager(net).add("style", tensors)
    assert_lora_free(net, state_snapshot(model()))


def test_not_a_weights_file_and_a_truncated_file_are_named(tmp_path: Path) -> None:
    net = model()
    before = state_snapshot(net)
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    truncated = tmp_path / "cut.safetensors"
    save_file(own_lora(1), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    pickle = tmp_path / "cut.pt"
    torch.save(own_lora(1), pickle)
    pickle.write_bytes(pickle.read_bytes()[:100])
    for path in (text, truncated, pickle):
        with pytest.raises(WeightsError, match=str(path)):
            LoraManager(net).add("style", path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        LoraManager(net).add("style", tmp_path / "missing.safetensors")
    assert_lora_free(net, before)
    assert LoraManager(net).names == ()


def test_a_weights_file_that_is_no_lora_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(model().state_dict(), path)
    with pytest.raises(WeightsError, match=rf"{path}: not a LoRA file"):
        LoraManager(model()).add("style", path)


def test_a_name_is_unique_and_an_unknown_name_is_a_key_error() -> None:
    net = model()
    loras = LoraManager(net)
    loras.add("style", own_lora(1))
    state = state_snapshot(net)
    with pytest.raises(ValueError, match="already loaded"):
        loras.add("style", own_lora(2))
    assert all(torch.equal(net.state_dict()[key], tensor) for key, tensor in state.items())
    with pytest.raises(ValueError, match="non-empty"):
        loras.add("", own_lora(2))
    for action in (loras.remove, lambda name: loras.set_scale(name, 1.0), loras.scale):
        with pytest.raises(KeyError, match="no LoRA named 'other'.*'style'"):
            action("other")


class ThirdPartyNet(fl.Chain):
    """A model of another package: it names its layers like diffusers and kohya through `ForeignModuleNames`."""

    def __init__(self) -> None:
        super().__init__(fl.Linear(8, 8), fl.Chain(fl.Linear(8, 8), fl.Linear(8, 8)), fl.Conv2d(2, 2, kernel_size=1))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        names = {"attn.to_q": "Linear", "attn.to_out.0": "Chain.Linear_1", "mlp.fc": "Chain.Linear_2"}
        if convention == DIFFUSERS:
            return names
        if convention == KOHYA:
            return {"lora_net_" + name.replace(".", "_"): path for name, path in names.items()}
        return {}


def third_party_expected(net: ThirdPartyNet, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for path in ("Linear", "Chain.Linear_1", "Chain.Linear_2"):
        layer = net[path]
        assert isinstance(layer, fl.Linear)
        x = F.linear(x, layer.weight + deltas.get(path, torch.zeros(())), layer.bias)
    return x


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers-lora", "processor"])
def test_a_third_party_model_gets_kohya_and_diffusers_files_by_naming_its_layers(layout: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ThirdPartyNet()
    down, up = torch.randn(4, 8), torch.randn(8, 4)
    module = {"kohya": "lora_net_attn_to_out_0", "processor": "attn.processor.to_out_lora"}.get(layout, "attn.to_out.0")
    suffixes = {
        "kohya": ("lora_down.weight", "lora_up.weight"),
        "peft": ("lora_A.weight", "lora_B.weight"),
        "diffusers-lora": ("lora.down.weight", "lora.up.weight"),
        "processor": ("down.weight", "up.weight"),
    }[layout]
    tensors = {f"{module}.{suffixes[0]}": down, f"{module}.{suffixes[1]}": up}
    if layout == "kohya":
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "lora.bin"  # the format comes from the keys, not the file name
    torch.save(tensors, path)
    x = torch.randn(3, 8)
    expected = third_party_expected(net, {"Chain.Linear_1": (0.5 if layout == "kohya" else 1.0) * up @ down}, x)
    LoraManager(net).add("style", path)
    assert isinstance(net["Chain.Linear_1"], LoraAdapter)
    assert_relative_close(net["Chain"](net["Linear"](x)), expected, TOLERANCE)


def test_a_foreign_format_on_a_model_without_names_is_refused() -> None:
    net = model()
    with pytest.raises(WeightsError, match=r"kohya LoRA, but Block does not name its layers.*ForeignModuleNames"):
        LoraManager(net).add(
            "style",
            {"lora_unet_x.lora_down.weight": torch.randn(2, 8), "lora_unet_x.lora_up.weight": torch.randn(4, 2)},
        )
    assert LoraManager(net).names == ()


def test_mixed_formats_are_refused_naming_an_example_of_each() -> None:
    tensors = {
        "lora_net_mlp_fc.lora_down.weight": torch.randn(2, 8),
        "attn.to_q.lora_A.weight": torch.randn(2, 8),
    }
    with pytest.raises(WeightsError, match=r"mixed: kohya \('lora_net_mlp_fc.lora_down.weight'\), diffusers"):
        LoraManager(ThirdPartyNet()).add("style", tensors)


def test_a_foreign_key_unknown_to_the_model_is_named() -> None:
    net = ThirdPartyNet()
    before = state_snapshot(net)
    tensors = {
        "lora_net_attn_to_q.lora_down.weight": torch.randn(2, 8),
        "lora_net_attn_to_q.lora_up.weight": torch.randn(8, 2),
        "lora_net_attn_to_k.lora_down.weight": torch.randn(2, 8),
        "lora_net_attn_to_k.lora_up.weight": torch.randn(8, 2),
        "lora_net_attn_to_k.alpha": torch.tensor(1.0),
    }
    with pytest.raises(WeightsError, match=r"3 key\(s\) match no layer of ThirdPartyNet.*lora_net_attn_to_k"):
        LoraManager(net).add("style", tensors)
    assert_lora_free(net, before)
    skipped = LoraManager(net).add("style", tensors, strict=False)
    assert skipped == [
        "lora_net_attn_to_k.lora_down.weight",
        "lora_net_attn_to_k.lora_up.weight",
        "lora_net_attn_to_k.alpha",
    ]


def test_a_1x1_convolution_lora_loads_onto_a_linear_and_back() -> None:
    torch.manual_seed(0)
    net = ThirdPartyNet()
    down, up = torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1)
    x = torch.randn(3, 8)
    expected = third_party_expected(net, {"Linear": up.flatten(1) @ down.flatten(1)}, x)
    LoraManager(net).add("style", {"attn.to_q.lora_A.weight": down, "attn.to_q.lora_B.weight": up})
    assert_relative_close(net["Chain"](net["Linear"](x)), expected, TOLERANCE)
    conv = net["Conv2d"]
    assert isinstance(conv, fl.Conv2d)
    down, up = torch.randn(1, 2), torch.randn(2, 1)
    image = torch.randn(1, 2, 4, 4)
    expected = F.conv2d(image, conv.weight + (up @ down)[:, :, None, None], conv.bias)
    LoraManager(net).add("on-conv", {"Conv2d.down.weight": down, "Conv2d.up.weight": up})
    assert_relative_close(net["Conv2d"](image), expected, TOLERANCE)
