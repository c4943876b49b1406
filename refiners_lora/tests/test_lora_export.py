"""`LoraManager.create`, `state_dict` and `save`: fresh trainable LoRAs, written in the refiners, kohya and
diffusers / PEFT layouts and read back by `add` onto a fresh model, and PEFT alphas read from safetensors metadata.

The model is a small Chain that names its layers the kohya and diffusers way (`ForeignModuleNames`, with an alias
and a layer the other library runs as a 1x1 convolution). A LoRA written and read back gives the outputs of the
LoRA it was written from within 1e-5 of max |output| (fp32; the diffusers layout bakes alpha / rank into lora_B).
Parity with diffusers' own `load_lora_weights` is checked on SD1.5 in tests/test_lora_sd15_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import refiners_core.fluxion as fl
import refiners_core.weights
from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_core.testing import assert_relative_close, state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.testing import ConvAndLinears, assert_lora_free, randomize_loras

LORA_LAYERS = ("Conv2d", "Linear_1", "Linear_2")


class PlainNet(ConvAndLinears):
    """A LoCon-able convolution and three Linears, named only by our layer paths."""

    def __init__(self) -> None:
        super().__init__(extra_linears=1)


class Net(PlainNet):
    """`PlainNet` with kohya and diffusers names: `Linear_1` has two diffusers names, `Linear_2` is a 1x1
    convolution there, and `Linear_3` has no foreign name."""

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        if convention == DIFFUSERS:
            return {"net.conv_in": "Conv2d", "net.proj": "Linear_1", "proj": "Linear_1", "net.proj_out": "Linear_2"}
        if convention == KOHYA:
            return {"lora_net_conv_in": "Conv2d", "lora_net_proj": "Linear_1", "lora_net_proj_out": "Linear_2"}
        return {}

    def foreign_pointwise_convolutions(self, convention: str) -> set[str]:
        return {"net.proj_out"} if convention == DIFFUSERS else {"lora_net_proj_out"}


def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def trained(model: nn.Module, rank: int = 2, alpha: float | None = 3.0, scale: float = 0.7) -> LoraManager:
    """A LoRA "style" created on `LORA_LAYERS` with random up and down weights, as if trained."""
    loras = LoraManager(model)
    adapters = loras.create("style", LORA_LAYERS, rank=rank, alpha=alpha, scale=scale)
    randomize_loras(adapters.values(), seed=2, std=0.5)
    return loras


def test_create_adds_trainable_loras_that_change_nothing_until_trained() -> None:
    model = net()
    expected = model(X)
    adapters = LoraManager(model).create("style", LORA_LAYERS, rank=4, alpha=2.0, scale=0.5)
    assert list(adapters) == list(LORA_LAYERS) and LoraManager(model).names == ("style",)
    assert all(model[path] is adapter for path, adapter in adapters.items())
    assert torch.equal(model(X), expected)
    conv = adapters["Conv2d"].lora
    assert isinstance(conv.down, fl.Conv2d) and conv.down.weight.shape == (4, 3, 3, 3) and conv.down.stride == (2, 2)
    for adapter in adapters.values():
        down, up = adapter.lora.down.weight, adapter.lora.up.weight
        assert isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor)
        assert torch.count_nonzero(up) == 0 and down.abs().min() > 0 and down.requires_grad
        assert adapter.scale == 0.5 * 2.0 / 4
    loss = trained(net()).model(X).square().sum()  # gradients reach the LoRA weights
    loss.backward()
    LoraManager(model).set_scale("style", 1.0)
    assert adapters["Linear_1"].scale == 2.0 / 4


@pytest.mark.parametrize(
    ("layers", "kwargs", "error", "match"),
    [
        (["Linear_1", "Linear_9"], {}, ValueError, "no layer at path 'Linear_9'"),
        (["Linear_1", "SiLU"], {}, TypeError, r"`Net.SiLU` is a SiLU"),
        (["Linear_1", "Linear_1"], {}, ValueError, "'Linear_1' and 'Linear_1' are the same layer"),
        ([], {}, ValueError, "no layer paths"),
        (["Linear_1"], {"rank": 0}, ValueError, "at least 1"),
        (["Linear_1"], {"name": ""}, ValueError, "non-empty"),
        (["Linear_1"], {"name": "taken"}, ValueError, "already loaded"),
    ],
)
def test_create_errors_leave_the_model_as_it_was(
    layers: list[str], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = net()
    loras = LoraManager(model)
    loras.create("taken", ["Linear_2"], rank=1)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    arguments: dict[str, Any] = {"name": "new", "rank": 2} | kwargs
    with pytest.raises(error, match=match):
        loras.create(arguments.pop("name"), layers, **arguments)
    assert loras.names == ("taken",) and list(model.state_dict()) == list(before)
    assert sum(isinstance(layer, LoraAdapter) for layer in model.modules()) == 1


@pytest.mark.parametrize("lora_format", ["refiners", "kohya", "diffusers"])
@pytest.mark.parametrize("alpha", [3.0, None])
def test_a_saved_lora_loads_back_with_the_same_outputs(lora_format: str, alpha: float | None, tmp_path: Path) -> None:
    model = net()
    trained(model, alpha=alpha)
    expected = model(X)
    path = tmp_path / f"style.{lora_format}.safetensors"
    LoraManager(model).save("style", path, format=lora_format)  # type: ignore[arg-type]
    fresh = net()
    assert not torch.allclose(fresh(X), expected)
    assert LoraManager(fresh).add("style", path, scale=0.7) == []
    assert_relative_close(fresh(X), expected, 1e-5)
    assert not any(name.startswith(f".{path.name}") for name in (p.name for p in tmp_path.iterdir()))
    with safe_open(path, framework="pt") as file:  # pyright: ignore[reportUnknownVariableType]
        assert file.metadata() == {"format": "pt"}  # pyright: ignore[reportUnknownMemberType]


def test_each_format_writes_the_keys_and_shapes_its_tools_read() -> None:
    loras = trained(net(), rank=2, alpha=3.0)
    refiners = loras.state_dict("style")
    assert {key: tuple(tensor.shape) for key, tensor in refiners.items()} == {
        "Conv2d.down.weight": (2, 3, 3, 3),
        "Conv2d.up.weight": (8, 2, 1, 1),
        "Conv2d.alpha": (),
        "Linear_1.down.weight": (2, 8),
        "Linear_1.up.weight": (16, 2),
        "Linear_1.alpha": (),
        "Linear_2.down.weight": (2, 16),
        "Linear_2.up.weight": (4, 2),
        "Linear_2.alpha": (),
    }
    assert all(refiners[f"{layer}.alpha"].item() == 3.0 for layer in LORA_LAYERS)
    kohya = loras.state_dict("style", "kohya")
    assert {key: tuple(tensor.shape) for key, tensor in kohya.items()} == {
        "lora_net_conv_in.lora_down.weight": (2, 3, 3, 3),  # LoCon: the kernel in down, a 1x1 up
        "lora_net_conv_in.lora_up.weight": (8, 2, 1, 1),
        "lora_net_conv_in.alpha": (),
        "lora_net_proj.lora_down.weight": (2, 8),
        "lora_net_proj.lora_up.weight": (16, 2),
        "lora_net_proj.alpha": (),
        "lora_net_proj_out.lora_down.weight": (2, 16, 1, 1),  # a 1x1 convolution there
        "lora_net_proj_out.lora_up.weight": (4, 2, 1, 1),
        "lora_net_proj_out.alpha": (),
    }
    assert torch.equal(kohya["lora_net_proj.lora_up.weight"], refiners["Linear_1.up.weight"])
    diffusers = loras.state_dict("style", "diffusers")
    assert {key: tuple(tensor.shape) for key, tensor in diffusers.items()} == {
        "net.conv_in.lora_A.weight": (2, 3, 3, 3),
        "net.conv_in.lora_B.weight": (8, 2, 1, 1),
        "net.proj.lora_A.weight": (2, 8),  # the first of the two names the model gives
        "net.proj.lora_B.weight": (16, 2),
        "net.proj_out.lora_A.weight": (2, 16, 1, 1),
        "net.proj_out.lora_B.weight": (4, 2, 1, 1),
    }
    assert torch.equal(diffusers["net.proj.lora_A.weight"], refiners["Linear_1.down.weight"])
    assert torch.allclose(diffusers["net.proj.lora_B.weight"], refiners["Linear_1.up.weight"] * 1.5)
    refiners["Linear_1.up.weight"].zero_()  # copies: the LoRA itself is untouched
    assert loras.state_dict("style")["Linear_1.up.weight"].abs().sum() > 0


def test_a_loaded_lora_writes_back_the_tensors_it_was_read_from() -> None:
    generator = torch.Generator().manual_seed(3)
    kohya = {
        "lora_net_proj.lora_down.weight": torch.randn(3, 8, generator=generator),
        "lora_net_proj.lora_up.weight": torch.randn(16, 3, generator=generator),
        "lora_net_proj.alpha": torch.tensor(1.5),
        "lora_net_proj_out.lora_down.weight": torch.randn(3, 16, 1, 1, generator=generator),
        "lora_net_proj_out.lora_up.weight": torch.randn(4, 3, 1, 1, generator=generator),
        "lora_net_proj_out.alpha": torch.tensor(6.0),
    }
    model = net()
    loras = LoraManager(model)
    loras.add("style", kohya)
    written = loras.state_dict("style", "kohya")
    assert list(written) == list(kohya)
    assert all(torch.equal(written[key], tensor) for key, tensor in kohya.items())
    loras.fuse()  # the LoRA weights are still there while fused
    assert all(torch.equal(loras.state_dict("style", "kohya")[key], tensor) for key, tensor in kohya.items())


def test_save_replaces_an_existing_file_only_once_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loras = trained(net())
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"previous version")

    def fail_half_way(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(refiners_core.weights, "save_file", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        loras.save("style", path)
    assert path.read_bytes() == b"previous version" and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    loras.save("style", path)
    assert LoraManager(net()).add("style", path) == []


@pytest.mark.parametrize("problem", ["unknown name", "missing folder", "no foreign name", "no names", "format"])
def test_save_errors_name_the_problem_and_write_no_file(problem: str, tmp_path: Path) -> None:
    model: nn.Module = net()
    name, lora_format, path = "style", "kohya", tmp_path / "style.safetensors"
    if problem == "unknown name":
        name, error, match = "other", KeyError, "no LoRA named 'other'"
    elif problem == "missing folder":
        path, error = tmp_path / "missing" / "style.safetensors", FileNotFoundError
        match = f"no folder {tmp_path / 'missing'}"
    elif problem == "no foreign name":
        error, match = ValueError, r"1 layer\(s\) have no kohya name: `Net.Linear_3`"
    elif problem == "no names":
        model = PlainNet()
        error, match = ValueError, "PlainNet does not name its layers the kohya way"
    else:
        lora_format, error, match = "comfy", ValueError, "unknown LoRA format 'comfy'"
    loras = LoraManager(model)
    loras.create("style", [*LORA_LAYERS, "Linear_3"] if problem == "no foreign name" else LORA_LAYERS, rank=2)
    with pytest.raises(error, match=match):
        loras.save(name, path, format=lora_format)  # type: ignore[arg-type]
    assert list(tmp_path.rglob("*")) == []
    loras.save("style", tmp_path / "style.safetensors")  # our own format works on any model and any layer


def peft_file(tmp_path: Path, config: dict[str, Any], alphas: dict[str, float] | None = None) -> tuple[Path, Net]:
    """A diffusers / PEFT LoRA file on `net.proj` and `net.proj_out` (rank 2) with `config` as its PEFT metadata,
    and the model with the same LoRA loaded with explicit alphas (the reference)."""
    generator = torch.Generator().manual_seed(4)
    tensors = {
        "net.proj.lora_A.weight": torch.randn(2, 8, generator=generator),
        "net.proj.lora_B.weight": torch.randn(16, 2, generator=generator),
        "net.proj_out.lora_A.weight": torch.randn(2, 16, 1, 1, generator=generator),
        "net.proj_out.lora_B.weight": torch.randn(4, 2, 1, 1, generator=generator),
    }
    path = tmp_path / "peft.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    reference = net()
    explicit = {f"net.{module}.alpha": torch.tensor(alpha) for module, alpha in (alphas or {}).items()}
    LoraManager(reference).add("style", tensors | explicit)
    return path, reference


@pytest.mark.parametrize(
    ("config", "alphas"),
    [
        ({"net.r": 2, "net.lora_alpha": 6}, {"proj": 6.0, "proj_out": 6.0}),
        ({"r": 2, "lora_alpha": 1, "alpha_pattern": {"proj_out": 5}}, {"proj": 1.0, "proj_out": 5.0}),
        ({"net.r": 2, "net.lora_alpha": 3, "net.use_rslora": True}, {"proj": 3 * 2**0.5, "proj_out": 3 * 2**0.5}),
        ({"net.r": 2}, {"proj": 8.0, "proj_out": 8.0}),  # PEFT's default lora_alpha
        ({"text_encoder.lora_alpha": 1}, {}),  # another component's configuration: alpha = rank
    ],
    ids=["global", "pattern", "rslora", "default", "other component"],
)
def test_peft_metadata_alphas_are_honoured(config: dict[str, Any], alphas: dict[str, float], tmp_path: Path) -> None:
    path, reference = peft_file(tmp_path, config, alphas)
    model = net()
    LoraManager(model).add("style", path)
    assert_relative_close(model(X), reference(X), 1e-5)


def test_an_alpha_key_wins_over_peft_metadata_and_bad_metadata_is_named(tmp_path: Path) -> None:
    path, reference = peft_file(tmp_path, {"lora_alpha": 4}, {"proj": 1.0, "proj_out": 4.0})
    tensors = refiners_core.weights.load_tensors(path) | {"net.proj.alpha": torch.tensor(1.0)}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 4})})
    model = net()
    LoraManager(model).add("style", path)
    assert_relative_close(model(X), reference(X), 1e-5)
    for bad, match in (
        ("{not json", "is not JSON"),
        ('{"lora_alpha": "big"}', "gives 'net.proj_out' the alpha 'big'"),
        ('{"alpha_pattern": {"proj(": 2}}', "has a bad alpha_pattern"),
    ):
        save_file(tensors, path, metadata={"lora_adapter_metadata": bad})
        model = net()
        before = state_snapshot(model)
        with pytest.raises(WeightsError, match=f"{path}: its 'lora_adapter_metadata' metadata {match}"):
            LoraManager(model).add("style", path)
        assert_lora_free(model, before)
