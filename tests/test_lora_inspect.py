"""`refiners lora inspect`: kohya and diffusers LoRA files of SD1.5 and SDXL (published module names, every layer
the models name, rank 1) checked against the published models and a model folder, before anything is loaded.

The files are built from the models' own `foreign_module_names`, anchored by names that published LoRA files use.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl
import refiners_core.weight_formats
import refiners_core.weights
from refiners_core.cli import main
from refiners_core.module_names import DIFFUSERS, KOHYA, ForeignModuleNames
from refiners_core.weights import save_tensors
from refiners_lora import LoraManager
from refiners_lora.inspection import inspect_lora
from refiners_sd15 import StableDiffusion_1
from refiners_sdxl import StableDiffusion_XL
from refiners_sdxl.testing import write_small_sdxl_folder

SUFFIXES = {KOHYA: (".lora_down.weight", ".lora_up.weight"), DIFFUSERS: (".lora_A.weight", ".lora_B.weight")}
PUBLISHED = {  # a module name of published LoRA files of each model and convention
    ("sd15", KOHYA): "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    ("sd15", DIFFUSERS): "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    ("sdxl", KOHYA): "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    ("sdxl", DIFFUSERS): "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
}
ARCHITECTURES = {"sd15": StableDiffusion_1.architecture, "sdxl": StableDiffusion_XL.architecture}
_models: dict[str, nn.Module] = {}


def architecture(kind: str) -> nn.Module:
    if kind not in _models:
        _models[kind] = ARCHITECTURES[kind]()
    return _models[kind]


def lora_tensors(model: nn.Module, convention: str, *, rank: int = 1, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """A LoRA of every layer `model` names in `convention` (one name per layer; for SDXL's kohya files, the original
    layout's, as sd-scripts writes them), zero weights, shapes that fit."""
    down_suffix, up_suffix = SUFFIXES[convention]
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    assert isinstance(model, ForeignModuleNames)
    names = dict(model.foreign_module_names(convention))
    original = ("_input_blocks_", "_middle_block_", "_output_blocks_") if isinstance(model, StableDiffusion_XL) else ()
    for name, path in sorted(names.items(), key=lambda item: not any(block in item[0] for block in original)):
        layer = model.get_submodule(path)
        if id(layer) in seen or (convention == DIFFUSERS and not name.startswith(("unet.", "text_encoder"))):
            continue
        seen.add(id(layer))
        if isinstance(layer, fl.Linear):
            down, up = torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank)
        elif isinstance(layer, fl.Conv2d):
            down = torch.zeros(rank, layer.in_channels, *layer.kernel_size)
            up = torch.zeros(layer.out_channels, rank, 1, 1)
        else:
            continue
        tensors |= {f"{name}{down_suffix}": down, f"{name}{up_suffix}": up, f"{name}.alpha": torch.tensor(alpha)}
    return tensors


def loadable_report(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    """The `--json` report of `refiners lora inspect PATH`, which exits 0 with nothing on stderr."""
    code, out, err = inspect(capsys, str(path), "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def assert_loads_uniformly(report: dict[str, Any], family: str, modules: int, *, rank: int, alpha: float) -> None:
    """The `--json` report says the file loads, all its `modules` matched, of one `family`, `rank` and `alpha`."""
    assert report["loads"] and report["modules_matched"] == modules
    assert report["families"] == {family: modules}
    assert report["ranks"] == [{"rank": rank, "modules": modules}]
    assert report["alphas"] == [{"alpha": alpha, "modules": modules}]


def inspect(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    code = main(["lora", "inspect", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("convention", [KOHYA, DIFFUSERS])
def test_published_names_of_every_layer_inspect_as_loadable_with_the_guessed_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, convention: str
) -> None:
    model = architecture(kind)
    tensors = lora_tensors(model, convention, rank=2, alpha=1.5)
    assert f"{PUBLISHED[kind, convention]}{SUFFIXES[convention][0]}" in tensors
    path = tmp_path / "lora.safetensors"
    save_tensors(path, tensors)

    report = loadable_report(capsys, path)

    modules = len(tensors) // 3
    assert report["format"] == convention and report["problems"] == []
    assert report["model"]["kind"] == kind and report["model"]["source"] is None
    assert report["model"]["class"] == type(model).__name__
    assert report["model"]["guessed_from"].startswith({"sd15": "SD1.5: ", "sdxl": "SDXL: "}[kind])
    assert report["modules"] == modules
    assert_loads_uniformly(report, "lora", modules, rank=2, alpha=1.5)
    assert {c["name"] for c in report["components"]} == {"unet", "clip_text_encoder"}
    assert sum(c["patched"] for c in report["components"]) == modules
    assert all(0 < c["patched"] <= c["layers"] for c in report["components"])
    loras = LoraManager(ARCHITECTURES[kind](device="meta"))
    assert loras.add("same", path) == []  # what inspect calls loadable loads (on meta: shapes and keys)


def test_keys_that_would_not_load_are_each_listed_with_the_reason_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = lora_tensors(architecture("sd15"), KOHYA)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors[f"{conv}.lora_down.weight"] = torch.zeros(1, 7, 3, 3)  # the layer takes 320 channels
    tensors["lora_unet_bogus_block.lora_down.weight"] = torch.zeros(1, 4)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.oft_blocks"] = torch.zeros(4, 2, 2)  # OFT: not applied
    path = tmp_path / "bad.safetensors"
    save_tensors(path, tensors)

    code, out, err = inspect(capsys, str(path))

    assert (code, err) == (1, "")
    assert "5 key(s) would not load:" in out
    assert f"'{conv}.lora_down.weight' has shape (1, 7, 3, 3) but layer `StableDiffusion_1.unet." in out
    assert (
        "'lora_unet_bogus_block.lora_down.weight': StableDiffusion_1 has no module named 'lora_unet_bogus_block'" in out
    )
    assert (
        "'lora_te_text_model_encoder_layers_0_mlp_fc1.oft_blocks': 'lora_te_text_model_encoder_layers_0_mlp_fc1"
        ".oft_blocks' is a OFT / BOFT (LyCORIS) weight, a family refiners-lora does not apply" in out
    )

    code, out, _ = inspect(capsys, str(path), "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and [problem["keys"] for problem in problems] == [
        ["lora_te_text_model_encoder_layers_0_mlp_fc1.oft_blocks"],
        [f"{conv}.alpha", f"{conv}.lora_down.weight", f"{conv}.lora_up.weight"],
        ["lora_unet_bogus_block.lora_down.weight"],
    ]
    with pytest.raises(refiners_core.weights.WeightsError, match="oft_blocks' is a OFT / BOFT"):  # the first, as add
        LoraManager(StableDiffusion_1.architecture(device="meta")).add("bad", path)


def test_a_loha_file_is_reported_by_its_family_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A kohya LoHa (LyCORIS) of every Linear layer of SD1.5's published LoRA names: family "loha", its rank and
    alpha, the base model guessed from its `hada_w1_b` weights."""
    lora, rank = lora_tensors(architecture("sd15"), KOHYA), 2
    tensors: dict[str, torch.Tensor] = {}
    for key, down in lora.items():
        module = key.removesuffix(".lora_down.weight")
        if module == key or down.ndim != 2:  # Linear layers only
            continue
        outputs = lora[f"{module}.lora_up.weight"].shape[0]
        tensors |= {f"{module}.hada_w{i}_a": torch.zeros(outputs, rank) for i in (1, 2)}
        tensors |= {f"{module}.hada_w{i}_b": torch.zeros(rank, down.shape[1]) for i in (1, 2)}
        tensors[f"{module}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "loha.safetensors"
    save_tensors(path, tensors)

    report = loadable_report(capsys, path)

    modules = len(tensors) // 5
    assert report["model"]["guessed_from"].startswith("SD1.5: ")
    assert_loads_uniformly(report, "loha", modules, rank=2, alpha=1.0)
    code, out, _ = inspect(capsys, str(path))
    assert code == 0 and f"families: loha ({modules})" in out
    assert LoraManager(StableDiffusion_1.architecture(device="meta")).add("same", path) == []


def test_an_sd15_file_against_sdxl_is_refused_whole_naming_both_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sd15.safetensors"
    save_tensors(path, lora_tensors(architecture("sd15"), KOHYA))

    code, out, _ = inspect(capsys, str(path), "--model", "sdxl", "--json")

    report = json.loads(out)
    assert code == 1 and not report["loads"] and report["model"]["guessed_from"] is None
    whole = report["problems"][0]
    assert whole["keys"] == [] and whole["reason"].startswith("the file is a LoRA for SD1.5 (")
    assert "but StableDiffusion_XL is SDXL" in whole["reason"]


def test_a_model_folder_is_built_from_its_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_small_sdxl_folder(tmp_path / "small-sdxl")
    small = StableDiffusion_XL.architecture(folder)
    assert all(parameter.is_meta for parameter in small.parameters())
    path = tmp_path / "small.safetensors"
    save_tensors(path, lora_tensors(small, KOHYA))

    code, out, _ = inspect(capsys, str(path), "--model", str(folder), "--json")
    assert code == 0 and json.loads(out)["model"] == {
        "kind": "sdxl",
        "source": str(folder),
        "class": "StableDiffusion_XL",
        "guessed_from": None,
    }
    code, out, _ = inspect(capsys, str(path), "--model", "sdxl")  # the published SDXL is much wider
    assert code == 1 and "would not load" in out and "expects" in out


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["missing.safetensors"], "no weights file at missing.safetensors"),
        (["text.safetensors"], "text.safetensors is not a safetensors file"),
        (["weights.safetensors"], "weights.safetensors: not a LoRA file"),
        (["lora.safetensors", "--model", "sd3"], "--model sd3: not a model kind (sd15|sdxl) nor a local folder"),
        (["refiners.safetensors"], "refiners.safetensors: its keys show no base model: pass --model sd15|sdxl"),
        (["sd2.safetensors"], "sd2.safetensors: its keys show a LoRA for SD2.x ('unet.down_blocks.1.attn2.to_k' takes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.safetensors").write_text("not weights")
    save_tensors(tmp_path / "weights.safetensors", {"unet.conv_in.weight": torch.zeros(4, 4)})
    save_tensors(tmp_path / "lora.safetensors", lora_tensors(architecture("sd15"), KOHYA))
    save_tensors(tmp_path / "refiners.safetensors", {"unet.x.down.weight": torch.zeros(1, 4)})
    sd2 = {
        "unet.down_blocks.1.attn2.to_k.lora_A.weight": torch.zeros(1, 1024),
        "unet.down_blocks.1.attn2.to_k.lora_B.weight": torch.zeros(4, 1),
    }
    save_tensors(tmp_path / "sd2.safetensors", sd2)

    code, out, err = inspect(capsys, *arguments)

    assert (code, out) == (2, "")
    assert err.startswith("refiners lora inspect: error: ") and expected in err and err.count("\n") == 1


def test_no_weight_is_read_whatever_the_size_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file declaring 2 GiB of weights, held as a hole (sparse), is inspected from its header and alphas: the loaders'
    readers are never called, the memory stays far below the file's size, and the model lives on the meta device."""
    model = architecture("sdxl")
    shapes = {key: tuple(tensor.shape) for key, tensor in lora_tensors(model, KOHYA).items()}
    per_rank = sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(".alpha"))
    rank = max(1, 2**31 // (4 * per_rank))
    path = tmp_path / "big.safetensors"
    write_sparse_lora(path, shapes, rank)
    assert path.stat().st_size > 2**31 * 0.9

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a weight reader was called")

    monkeypatch.setattr(refiners_core.weights, "load_tensors", refuse)
    monkeypatch.setattr(refiners_core.weights, "read_safetensors", refuse)
    monkeypatch.setattr(refiners_core.weight_formats, "read_safetensors", refuse)
    report = inspect_lora(path)
    layer = report.plan.applicable[0].layer
    assert report.loads and isinstance(layer, fl.Linear | fl.Conv2d) and layer.weight.is_meta
    assert report.to_json()["ranks"] == [{"rank": rank, "modules": len(shapes) // 3}]
    assert report.to_json()["alphas"] == [{"alpha": 2.0, "modules": len(shapes) // 3}]

    script = (
        "import resource, sys; from refiners_core.cli import main; code = main(['lora', 'inspect', sys.argv[1]]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, code)"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    peak, code = result.stdout.split()[-2:]
    assert code == "0", result.stdout + result.stderr
    assert int(peak) < 2**31 / 2, f"peak memory {int(peak) / 2**20:.0f} MiB for a file of 2 GiB"


def write_sparse_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int) -> None:
    """A float32 safetensors LoRA of `shapes` at `rank` whose alphas are 2 and whose other data is a hole."""
    header: dict[str, Any] = {}
    offset = 0
    alphas: list[tuple[int, bytes]] = []
    for key, shape in sorted(shapes.items()):
        if key.endswith(".alpha"):
            alphas.append((offset, torch.tensor(2.0).numpy().tobytes()))
        else:
            shape = (rank, *shape[1:]) if key.endswith(".lora_down.weight") else (shape[0], rank, *shape[2:])
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        start = file.tell()
        for position, data in alphas:
            file.seek(start + position)
            file.write(data)
        file.truncate(start + offset)
