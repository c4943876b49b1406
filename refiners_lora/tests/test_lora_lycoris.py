"""LyCORIS (LoHa, LoKr, Tucker LoCon, full diffs) and DoRA files, read by `LoraManager` from the on-disk layout of
their reference libraries and compared with those libraries' own modules on random weights.

References: the `lycoris-lora` package's `LohaModule`, `LokrModule` and `LoConModule` (kohya names
`lora_unet_...`, as its `custom_state_dict` writes them), and PEFT's `LoHaConfig`, `LoKrConfig` and `LoraConfig(
use_dora=True)` (keys from `get_peft_model_state_dict`, the alpha in the `lora_adapter_metadata` entry as diffusers
writes it). Outputs agree within 1e-4 relative (`assert_relative_close`), unfused and fused. Each reference first
proves it changes the layer's output, so that the comparison means something.

`lycoris.modules` is imported inside the tests: importing it loads the whole `lycoris` package, which needs only
torch, einops, toml, tqdm, numpy and safetensors (checked with diffusers, transformers, torchvision, triton and
tilelang blocked: its kohya helpers and fused kernels are optional), all in the lock, lycoris-lora being a test extra.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model, get_peft_model_state_dict  # pyright: ignore[reportPrivateImportUsage]
from safetensors.torch import save_file
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_core.testing import assert_relative_close, state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraManager
from refiners_lora.delta_adapter import DeltaAdapter
from refiners_lora.families import dora, recognize
from refiners_lora.planning import plan_lora
from refiners_lora.testing import assert_lora_free, randomize_adapter, write_peft_file

LINEAR_INPUT = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
CONV_INPUT = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))


class Net(fl.Chain):
    """A Linear and a 3x3 Conv2d that name themselves `fc` / `conv` (diffusers) and `lora_unet_fc` / ... (kohya)."""

    def __init__(self) -> None:
        super().__init__(fl.Linear(16, 12), fl.Conv2d(4, 6, kernel_size=3, padding=1))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        names = {"fc": "Linear", "conv": "Conv2d"}
        if convention == DIFFUSERS:
            return names
        if convention == KOHYA:
            return {f"lora_unet_{name}": path for name, path in names.items()}
        return {}

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self[0](LINEAR_INPUT), self[1](CONV_INPUT)


class TorchNet(nn.Module):
    """The same two layers as plain torch modules, for the reference libraries to wrap."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.fc, self.conv = nn.Linear(16, 12), nn.Conv2d(4, 6, kernel_size=3, padding=1)
        self.fc.load_state_dict(net[0].state_dict())
        self.conv.load_state_dict(net[1].state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


# --- lycoris-lora -----------------------------------------------------------------------------------------------

LYCORIS_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "loha": ("LohaModule", {"lora_dim": 4, "alpha": 2.0}),
    "loha-tucker": ("LohaModule", {"lora_dim": 3, "alpha": 5.0, "use_tucker": True}),
    "loha-dora": ("LohaModule", {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}),
    "lokr": ("LokrModule", {"lora_dim": 2, "alpha": 3.0, "factor": 4}),
    "lokr-both": ("LokrModule", {"lora_dim": 1, "alpha": 3.0, "factor": 4, "decompose_both": True}),
    "lokr-tucker": ("LokrModule", {"lora_dim": 1, "alpha": 3.0, "factor": 2, "use_tucker": True}),
    "lokr-full": ("LokrModule", {"lora_dim": 2, "alpha": 3.0, "full_matrix": True}),
    "lokr-dora": ("LokrModule", {"lora_dim": 2, "alpha": 3.0, "factor": 4, "weight_decompose": True}),
    "locon-tucker": ("LoConModule", {"lora_dim": 3, "alpha": 1.0, "use_tucker": True}),
    "locon-dora": ("LoConModule", {"lora_dim": 4, "alpha": 8.0, "weight_decompose": True}),
    "locon-dora-in": ("LoConModule", {"lora_dim": 4, "alpha": 8.0, "weight_decompose": True, "wd_on_out": False}),
}


def lycoris_file(reference: TorchNet, case: str, path: Path, seed: int = 3) -> dict[str, nn.Module]:
    """Wrap both layers of `reference` with the LyCORIS module of `case` (random weights) and write its kohya file to
    `path`; returns the LyCORIS modules by layer name."""
    import lycoris.modules as modules

    class_name, kwargs = LYCORIS_CASES[case]
    module_class = getattr(modules, class_name)
    wrapped: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    for index, (name, layer) in enumerate((("fc", reference.fc), ("conv", reference.conv))):
        module = module_class(f"lora_unet_{name}", layer, multiplier=1.0, **kwargs)
        randomize_adapter(module, torch.Generator().manual_seed(seed + index), std=0.3)
        wrapped[name] = module.eval()
        for key, tensor in module.custom_state_dict().items():
            tensors[f"lora_unet_{name}.{key}"] = tensor.detach().clone().contiguous()
    save_file(tensors, path)
    return wrapped


def lycoris_outputs(wrapped: dict[str, nn.Module], multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        for module in wrapped.values():
            setattr(module, "multiplier", multiplier)  # noqa: B010 (nn.Module's __setattr__ types only tensors)
        return wrapped["fc"](LINEAR_INPUT), wrapped["conv"](CONV_INPUT)


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_files_match_lycoris_modules_unfused_and_fused(case: str, tmp_path: Path) -> None:
    ours = net()
    base = ours.outputs()
    expected = lycoris_outputs(lycoris_file(TorchNet(ours), case, tmp_path / "lycoris.safetensors"))
    assert all((e - b).abs().max() > 1e-3 for e, b in zip(expected, base, strict=True))  # the update is felt
    loras = LoraManager(ours)
    loras.add("style", tmp_path / "lycoris.safetensors")
    assert isinstance(ours[1], DeltaAdapter)  # the Linear of "locon-*" is a plain LoRA (`LoraAdapter`)
    for actual, wanted in zip(ours.outputs(), expected, strict=True):
        assert_relative_close(actual, wanted, what=f"{case} unfused")
    loras.fuse()
    for actual, wanted in zip(ours.outputs(), expected, strict=True):
        assert_relative_close(actual, wanted, what=f"{case} fused")
    loras.unfuse()


@pytest.mark.parametrize("case", ["loha", "lokr", "locon-tucker"])
def test_set_scale_matches_the_lycoris_multiplier(case: str, tmp_path: Path) -> None:
    ours = net()
    wrapped = lycoris_file(TorchNet(ours), case, tmp_path / "lycoris.safetensors")
    loras = LoraManager(ours)
    loras.add("style", tmp_path / "lycoris.safetensors", scale=2.0)
    loras.set_scale("style", 0.4)
    for actual, wanted in zip(ours.outputs(), lycoris_outputs(wrapped, multiplier=0.4), strict=True):
        assert_relative_close(actual, wanted, what=f"{case} at scale 0.4")


# --- PEFT --------------------------------------------------------------------------------------------------------

PEFT_CASES: dict[str, Callable[[], Any]] = {
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["fc", "conv"]),
    "loha-effective-conv": lambda: LoHaConfig(r=3, alpha=2, target_modules=["fc", "conv"], use_effective_conv2d=True),
    "lokr": lambda: LoKrConfig(r=2, alpha=6, target_modules=["fc", "conv"], decompose_factor=4),
    "lokr-whole": lambda: LoKrConfig(r=2, alpha=6, target_modules=["fc", "conv"]),
    "lokr-both": lambda: LoKrConfig(
        r=1, alpha=3, target_modules=["fc", "conv"], decompose_both=True, decompose_factor=4
    ),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["fc", "conv"], use_dora=True),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_files_match_peft_unfused_and_fused(case: str, tmp_path: Path) -> None:
    ours = net()
    base = ours.outputs()
    config = PEFT_CASES[case]()
    reference = get_peft_model(TorchNet(ours), config).eval()
    randomize_adapter(reference, torch.Generator().manual_seed(5), std=0.3)
    with torch.no_grad():
        expected = reference.base_model.model.fc(LINEAR_INPUT), reference.base_model.model.conv(CONV_INPUT)
    assert all((e - b).abs().max() > 1e-3 for e, b in zip(expected, base, strict=True))  # the update is felt
    alpha = {"lora_alpha": config.lora_alpha} if isinstance(config, LoraConfig) else {"alpha": config.alpha}
    metadata = {"lora_adapter_metadata": json.dumps({"r": config.r, **alpha}), "format": "pt"}
    tensors = {key: tensor.contiguous() for key, tensor in get_peft_model_state_dict(reference).items()}
    assert all(key.startswith("base_model.model.") for key in tensors)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata=metadata)
    loras = LoraManager(ours)
    loras.add("style", tmp_path / "adapter_model.safetensors")
    for actual, wanted in zip(ours.outputs(), expected, strict=True):
        assert_relative_close(actual, wanted, what=f"PEFT {case} unfused")
    loras.fuse()
    for actual, wanted in zip(ours.outputs(), expected, strict=True):
        assert_relative_close(actual, wanted, what=f"PEFT {case} fused")


# --- behaviour ---------------------------------------------------------------------------------------------------


def loha_and_lora_file(seed: int = 7) -> dict[str, torch.Tensor]:
    """A kohya file mixing families per module: a LoHa on the Linear, a plain LoCon on the convolution."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.3

    return {
        "lora_unet_fc.hada_w1_a": randn(12, 2),
        "lora_unet_fc.hada_w1_b": randn(2, 16),
        "lora_unet_fc.hada_w2_a": randn(12, 2),
        "lora_unet_fc.hada_w2_b": randn(2, 16),
        "lora_unet_fc.alpha": torch.tensor(1.0),
        "lora_unet_conv.lora_down.weight": randn(2, 4, 3, 3),
        "lora_unet_conv.lora_up.weight": randn(6, 2, 1, 1),
    }


def test_a_file_mixing_loha_and_lora_loads_both_and_remove_restores_bit_for_bit() -> None:
    ours = net()
    before, base = state_snapshot(ours), ours.outputs()
    tensors = loha_and_lora_file()
    LoraManager(ours).add("mixed", tensors, scale=0.7)
    with torch.no_grad():
        w1 = tensors["lora_unet_fc.hada_w1_a"] @ tensors["lora_unet_fc.hada_w1_b"]
        w2 = tensors["lora_unet_fc.hada_w2_a"] @ tensors["lora_unet_fc.hada_w2_b"]
        expected = base[0] + 0.7 * 0.5 * LINEAR_INPUT @ (w1 * w2).t()
    assert_relative_close(ours.outputs()[0], expected, what="LoHa by hand")
    assert (ours.outputs()[1] - base[1]).abs().max() > 1e-3
    LoraManager(ours).remove("mixed")
    assert_lora_free(ours, before)
    assert all(torch.equal(a, b) for a, b in zip(ours.outputs(), base, strict=True))


def test_full_diffs_change_weight_and_bias_and_unfuse_restores_both() -> None:
    ours = net()
    before = state_snapshot(ours)
    generator = torch.Generator().manual_seed(8)
    diff, diff_b = torch.randn(12, 16, generator=generator), torch.randn(12, generator=generator)
    loras = LoraManager(ours)
    loras.add("full", {"lora_unet_fc.diff": diff, "lora_unet_fc.diff_b": diff_b}, scale=0.5)
    layer = ours[0]
    assert isinstance(layer, DeltaAdapter) and layer.target.bias is not None
    expected = torch.nn.functional.linear(
        LINEAR_INPUT, layer.target.weight + 0.5 * diff, layer.target.bias + 0.5 * diff_b
    )
    assert_relative_close(ours.outputs()[0], expected, what="full diff unfused")
    loras.fuse()
    assert_relative_close(ours.outputs()[0], expected, what="full diff fused")
    loras.unfuse()
    loras.remove("full")
    assert_lora_free(ours, before)


def test_dora_at_scale_zero_leaves_outputs_and_stacks_with_a_lora_alike_fused_and_unfused(tmp_path: Path) -> None:
    ours = net()
    base = ours.outputs()
    lycoris_file(TorchNet(ours), "locon-dora", tmp_path / "dora.safetensors")
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors", scale=0.0)
    for actual, wanted in zip(ours.outputs(), base, strict=True):
        assert_relative_close(actual, wanted, what="DoRA at scale 0")
    loras.set_scale("dora", 0.8)
    loras.add("mixed", loha_and_lora_file(), scale=1.3)
    unfused = ours.outputs()
    loras.fuse()
    for actual, wanted in zip(ours.outputs(), unfused, strict=True):
        assert_relative_close(actual, wanted, what="DoRA stacked with a LoHa and a LoCon, fused")


def test_a_bad_module_among_good_ones_applies_nothing_and_is_named() -> None:
    ours = net()
    before = state_snapshot(ours)
    tensors = loha_and_lora_file()
    del tensors["lora_unet_fc.hada_w2_b"]
    with pytest.raises(WeightsError, match=r"'lora_unet_fc.hada_w1_a' is a LoHa weight with no hada_w2_b beside it"):
        LoraManager(ours).add("bad", tensors)
    assert_lora_free(ours, before)
    assert LoraManager(ours).names == ()


def test_a_lokr_that_does_not_compose_to_the_layer_shape_names_both_shapes() -> None:
    ours = net()
    before = state_snapshot(ours)
    tensors = {"lora_unet_fc.lokr_w1": torch.randn(3, 4), "lora_unet_fc.lokr_w2": torch.randn(4, 5)}
    with pytest.raises(
        WeightsError, match=r"LoKr update of shape \(12, 20\), but the layer's weight has shape \(12, 16\)"
    ):
        LoraManager(ours).add("bad", tensors)
    assert_lora_free(ours, before)


@pytest.mark.parametrize(
    ("suffix", "family"),
    [("oft_blocks", "OFT / BOFT"), ("a1.weight", "GLoRA"), ("boft_R", "BOFT"), ("on_input", r"\(IA\)\^3")],
)
def test_an_unsupported_family_refuses_the_whole_file_naming_it(suffix: str, family: str) -> None:
    ours = net()
    before = state_snapshot(ours)
    tensors = loha_and_lora_file() | {f"lora_unet_conv.{suffix}": torch.randn(2, 3, 3)}
    with pytest.raises(WeightsError, match=rf"'lora_unet_conv.{suffix}' is a {family}.* weight"):
        LoraManager(ours).add("other", tensors, strict=False)
    assert_lora_free(ours, before)


def test_recognize_names_family_rank_alpha_and_factor() -> None:
    tensors = {role: torch.randn(3, 3) for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    tensors["hada_t1"] = tensors["hada_t2"] = torch.randn(3, 3, 3, 3)
    recognized = recognize(tensors | {"alpha": torch.tensor(1.5)}, {role: role for role in [*tensors, "alpha"]})
    assert (recognized.description, recognized.rank, recognized.alpha, recognized.factor) == (
        "LoHa (Tucker)",
        3,
        1.5,
        0.5,
    )


def test_saving_a_lycoris_lora_is_refused_naming_the_layer_and_family() -> None:
    ours = net()
    LoraManager(ours).add("mixed", loha_and_lora_file())
    with pytest.raises(ValueError, match=r"cannot write LoRA 'mixed': its update of `Linear` is a LoHa"):
        LoraManager(ours).state_dict("mixed", "kohya")


def test_plan_lora_tells_every_module_its_layer_family_rank_and_problem_without_changing_the_model() -> None:
    ours = net()
    before = state_snapshot(ours)
    tensors = loha_and_lora_file() | {"lora_unet_other.diff": torch.randn(3, 3)}
    tensors["lora_unet_conv.lora_up.weight"] = torch.randn(6, 3, 1, 1)  # rank 3 against a rank-2 down
    plan = plan_lora(ours, tensors, "file.safetensors")
    found = {module.module: module for module in plan.modules}
    fc, conv, other = found["lora_unet_fc"], found["lora_unet_conv"], found["lora_unet_other"]
    assert (fc.path, fc.problem) == ("Linear", None)
    assert fc.recognized is not None and (fc.recognized.description, fc.recognized.rank, fc.recognized.alpha) == (
        "LoHa",
        2,
        1.0,
    )
    assert conv.path == "Conv2d" and conv.problem is not None
    assert "file.safetensors: 'lora_unet_conv.lora_up.weight' has shape (6, 3, 1, 1)" in conv.problem
    assert other.path is None and plan.unmatched == ["lora_unet_other.diff"]
    assert [module.module for module in plan.applicable] == ["lora_unet_fc"]
    assert_lora_free(ours, before)


def test_a_half_precision_file_is_computed_in_the_model_dtype() -> None:
    half = {key: tensor.half() for key, tensor in loha_and_lora_file().items()}
    from_half, from_float = net(), net()
    LoraManager(from_half).add("half", half)
    LoraManager(from_float).add("float", {key: tensor.float() for key, tensor in half.items()})
    assert all(torch.equal(a, b) for a, b in zip(from_half.outputs(), from_float.outputs(), strict=True))


# --- DoRA's low-rank path (unfused, as PEFT runs it) --------------------------------------------------------------


def peft_dora(ours: Net, path: Path, seed: int = 5) -> Any:
    """PEFT's DoRA (rank 4, alpha 6) on both layers of a copy of `ours`, random weights, its file written to `path`."""
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["fc", "conv"], use_dora=True)
    reference = get_peft_model(TorchNet(ours), config).eval()
    write_peft_file(reference, config, path, seed=seed)
    return reference


class ConvNet(fl.Chain):
    """One Conv2d named `conv` (diffusers)."""

    def __init__(self, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
        super().__init__(fl.Conv2d(4, 6, kernel_size, stride=stride, padding=padding, dilation=dilation))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        return {"conv": "Conv2d"} if convention == DIFFUSERS else {}


class TorchConvNet(nn.Module):
    def __init__(self, net: ConvNet) -> None:
        super().__init__()
        layer = net[0]
        assert isinstance(layer, fl.Conv2d)
        self.conv = nn.Conv2d(4, 6, layer.kernel_size, layer.stride, layer.padding, layer.dilation)  # pyright: ignore[reportArgumentType]
        self.conv.load_state_dict(layer.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "dilation"), [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 2, 0, 1)]
)
def test_dora_on_convolutions_matches_peft_unfused_and_fused(
    kernel_size: int, stride: int, padding: int, dilation: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    ours = ConvNet(kernel_size, stride, padding, dilation).eval()
    with torch.no_grad():
        base = ours(CONV_INPUT)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["conv"], use_dora=True)
    reference = get_peft_model(TorchConvNet(ours), config).eval()
    write_peft_file(reference, config, tmp_path / "dora.safetensors", seed=9)
    with torch.no_grad():
        expected = reference(CONV_INPUT)
    assert (expected - base).abs().max() > 1e-3  # the update is felt
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors")
    adapter = ours[0]
    assert isinstance(adapter, DeltaAdapter) and adapter.low_rank
    for how in ("unfused, first call", "unfused, kept norm", "fused"):
        if how == "fused":
            loras.fuse()
        with torch.no_grad():
            assert_relative_close(ours(CONV_INPUT), expected, what=f"DoRA conv {kernel_size}x{kernel_size} {how}")


def test_dora_on_a_dilated_convolution_is_the_fused_update_unfused(tmp_path: Path) -> None:
    """PEFT's DoRA leaves the dilation out of its down convolution: the dense update, fused, is the reference."""
    torch.manual_seed(0)
    ours = ConvNet(3, 1, 2, 2).eval()
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["conv"], use_dora=True)
    write_peft_file(get_peft_model(TorchConvNet(ours), config), config, tmp_path / "dora.safetensors", seed=9)
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors", scale=0.7)
    with torch.no_grad():
        unfused = ours(CONV_INPUT)
        loras.fuse()
        assert_relative_close(unfused, ours(CONV_INPUT), what="DoRA on a dilated convolution, unfused")


def test_dora_gradients_match_the_dense_formula_and_peft_for_the_magnitude(tmp_path: Path) -> None:
    ours = net()
    reference = peft_dora(ours, tmp_path / "dora.safetensors")
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors")
    adapter = ours[0]
    assert isinstance(adapter, DeltaAdapter) and adapter.low_rank
    tensors = adapter.delta.tensors()
    with torch.no_grad():
        adapter(LINEAR_INPUT)  # a call without gradients keeps the norm: the next call must not use it
    weights = {role: tensor.detach().clone().requires_grad_() for role, tensor in tensors.items()}
    for tensor in tensors.values():
        tensor.requires_grad_()
    upstream = torch.randn(3, 12, generator=torch.Generator().manual_seed(11))
    (adapter(LINEAR_INPUT) * upstream).sum().backward()
    target = adapter.target
    factor = adapter.delta.recognized.factor
    delta = factor * weights["up"] @ weights["down"]
    dense = target.weight + dora.change(target.weight, delta, "magnitude", weights["magnitude"])
    (torch.nn.functional.linear(LINEAR_INPUT, dense, target.bias) * upstream).sum().backward()
    for role, tensor in tensors.items():
        actual, wanted = tensor.grad, weights[role].grad
        assert actual is not None and wanted is not None and actual.abs().max() > 1e-3
        assert_relative_close(actual, wanted, what=f"gradient of DoRA {role}")
    peft_fc = reference.base_model.model.fc
    (peft_fc(LINEAR_INPUT) * upstream).sum().backward()
    ours_magnitude, peft_magnitude = tensors["magnitude"].grad, peft_fc.lora_magnitude_vector["default"].weight.grad
    assert ours_magnitude is not None and peft_magnitude is not None
    assert_relative_close(ours_magnitude, peft_magnitude, what="gradient of DoRA magnitude against PEFT")


def test_dora_norm_is_kept_between_calls_and_computed_again_when_a_weight_changes_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[int] = []
    output_scale = dora.output_scale

    def counted(*args: Any) -> torch.Tensor:
        computed.append(1)
        return output_scale(*args)

    monkeypatch.setattr(dora, "output_scale", counted)
    ours, fresh = net(), net()
    peft_dora(ours, tmp_path / "dora.safetensors")
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors")
    first = ours.outputs()
    assert all(torch.equal(a, b) for a, b in zip(ours.outputs(), first, strict=True))
    assert len(computed) == 2  # once per layer, however many calls
    adapter, fresh_layer = ours[0], fresh[0]
    assert isinstance(adapter, DeltaAdapter) and isinstance(fresh_layer, fl.Linear)
    with torch.no_grad():
        adapter.target.weight.mul_(1.5)  # as fusing another LoRA would, in place
        fresh_layer.weight.mul_(1.5)
        adapter.delta.tensors()["up"].add_(0.1)
    LoraManager(fresh).add("dora", tmp_path / "dora.safetensors")
    fresh_adapter = fresh[0]
    assert isinstance(fresh_adapter, DeltaAdapter)
    with torch.no_grad():
        fresh_adapter.delta.tensors()["up"].add_(0.1)
    expected = fresh.outputs()
    computed.clear()
    changed = ours.outputs()
    assert len(computed) == 1  # the Linear's norm; the convolution's weights did not change
    assert (changed[0] - first[0]).abs().max() > 1e-3
    for actual, wanted in zip(changed, expected, strict=True):
        assert_relative_close(actual, wanted, what="DoRA after its layer's weight changed in place")
    loras.fuse()
    loras.unfuse()  # puts the weights back with `copy_`
    ours.outputs()
    assert len(computed) == 3
    ours.to(torch.float64)
    assert adapter.delta.output_scale(adapter.target.weight).dtype == torch.float64


def test_dora_set_scale_after_a_call_moves_the_layer_by_that_share_of_the_change(tmp_path: Path) -> None:
    ours = net()
    base = ours.outputs()
    peft_dora(ours, tmp_path / "dora.safetensors")
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors")
    full = ours.outputs()
    loras.set_scale("dora", 0.3)
    for actual, before, after in zip(ours.outputs(), base, full, strict=True):
        assert_relative_close(actual, before + 0.3 * (after - before), what="DoRA at scale 0.3")


def test_dora_on_top_of_another_adapter_of_its_layer_adds_its_own_change_alike_unfused_and_fused(
    tmp_path: Path,
) -> None:
    ours = net()
    peft_dora(ours, tmp_path / "dora.safetensors")
    loras = LoraManager(ours)
    loras.add("dora", tmp_path / "dora.safetensors", scale=0.8)
    loras.add("mixed", loha_and_lora_file(), scale=1.3)  # injected inside the DoRA's adapters, around the layers
    stacked = [layer for layer in ours.modules() if isinstance(layer, DeltaAdapter) and layer.low_rank]
    assert len(stacked) == 2 and all(layer[0] is not layer.target for layer in stacked)
    unfused = ours.outputs()
    loras.fuse()
    for actual, wanted in zip(ours.outputs(), unfused, strict=True):
        assert_relative_close(actual, wanted, what="DoRA stacked on a LoHa and a LoCon, fused")
