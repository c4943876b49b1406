"""Per-block LoRA scales (`LoraManager.set_scale` with a dict or a list) on SD1.5 and SDXL models.

- A diffusers `set_adapters` dictionary gives the same UNet and text-encoder outputs as diffusers' own
  `StableDiffusionPipeline.set_adapters` with the same dictionary, within 1e-4 of max |reference| in fp32, on a small
  SD1.5 (two levels, two layers per block) with a LoRA on every attention, residual-block and sampler layer.
- An A1111 "LoRA Block Weight" list gives each layer the value of the extension's block that holds it; the reference
  is the original checkpoint's numbering (`input_blocks.N`, `middle_block`, `output_blocks.N`: the extension's INnn,
  M00, OUTnn), read from the model's kohya module names in that layout, for the published SD1.5 and SDXL UNets
  built on the meta device.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline  # type: ignore[import-untyped]

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_lora import LoraManager
from refiners_lora.block_weights import BLOCK_WEIGHT_PRESETS, block_multipliers, block_weight_names
from refiners_lora.testing import randomize_loras
from refiners_sd15 import SD15_UNET, SD1UNet, StableDiffusion_1
from refiners_sd15.testing import SMALL_UNET_DIFFUSERS_CONFIG, DiffusersReferences, paired_outputs
from refiners_sdxl import SDXLUNet, StableDiffusion_XL
from refiners_sdxl.config import SDXL_BASE_UNET
from refiners_sdxl.testing import write_small_sdxl_folder

UNET_CONFIG = {**SMALL_UNET_DIFFUSERS_CONFIG, "layers_per_block": 2}
"""Two layers per down block and three per up block, as in SD1.5: the issue's `"up": [0.0, 1.0, 1.0]` fits."""
SCALES: dict[str, Any] = {"unet": {"down": 0.5, "mid": 2.0, "up": [0.0, 1.0, 1.5]}, "text_encoder": 0.8}
TEXT_MODULES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_blocks"), unet_config=UNET_CONFIG)


def outputs(sd: StableDiffusion_1, pipe: StableDiffusionPipeline) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ours, theirs) for the UNet and for the text encoder."""
    ours_unet, their_unet, ours_text, their_text = paired_outputs(sd, pipe.unet, pipe.text_encoder, 64, PROMPT)
    return [(ours_unet, their_unet), (ours_text, their_text)]


def relative_errors(sd: StableDiffusion_1, pipe: StableDiffusionPipeline) -> list[float]:
    return [((ours - theirs).abs().max() / theirs.abs().max()).item() for ours, theirs in outputs(sd, pipe)]


def lora_paths(sd: StableDiffusion_1) -> list[str]:
    """Every Linear and Conv2d of the UNet's down, mid and up blocks (diffusers' dictionaries cannot scale the
    others: its `set_adapters` fails on them), and two text-encoder layers."""
    names = sd.foreign_module_names(DIFFUSERS)
    unet = [
        path
        for name, path in names.items()
        if name.startswith(("unet.down_blocks", "unet.mid_block", "unet.up_blocks"))
        and isinstance(sd.get_submodule(path), (fl.Linear, fl.Conv2d))
    ]
    return unet + [names[f"text_encoder.text_model.{module}"] for module in TEXT_MODULES]


def test_a_diffusers_scale_dict_gives_the_outputs_of_diffusers_set_adapters(
    references: DiffusersReferences, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(references.folder)
    loras = LoraManager(sd)
    adapters = loras.create("style", lora_paths(sd), rank=4, alpha=2.0)
    randomize_loras(adapters.values(), seed=1, std=0.2)
    path = tmp_path / "style.safetensors"
    loras.save("style", path, format="diffusers")
    pipe = references.pipeline()
    pipe.load_lora_weights(str(path), adapter_name="style")  # pyright: ignore[reportUnknownMemberType]
    assert max(relative_errors(sd, pipe)) <= 1e-4, "same LoRA at scale 1"
    pipe.set_adapters("style", adapter_weights=copy.deepcopy(SCALES))  # pyright: ignore[reportUnknownMemberType]
    assert min(relative_errors(sd, pipe)) > 1e-3, "the dictionary changes both outputs"
    loras.set_scale("style", SCALES)
    assert max(relative_errors(sd, pipe)) <= 1e-4
    assert loras.scale("style") == SCALES
    other = {"unet": {"down": {"block_0": [2.0, 0.0]}, "up": {"block_1": 0.25}}}
    pipe.set_adapters("style", adapter_weights=copy.deepcopy(other))  # pyright: ignore[reportUnknownMemberType]
    loras.set_scale("style", other)
    assert max(relative_errors(sd, pipe)) <= 1e-4


def ldm_blocks(unet: SD1UNet | SDXLUNet) -> dict[str, str]:
    """Layer path -> the extension's block name, from the model's kohya names in the original checkpoint's layout."""
    blocks: dict[str, str] = {}
    for name, path in unet.foreign_module_names(KOHYA).items():
        if match := re.match(r"lora_unet_input_blocks_(\d+)_", name):
            blocks[path] = f"IN{int(match[1]):02d}"
        elif match := re.match(r"lora_unet_output_blocks_(\d+)_", name):
            blocks[path] = f"OUT{int(match[1]):02d}"
        elif name.startswith("lora_unet_middle_block_"):
            blocks[path] = "M00"
    return blocks


@pytest.mark.parametrize("unet_class", [SD1UNet, SDXLUNet])
def test_a_block_weight_list_gives_each_layer_the_value_of_the_extensions_block(
    unet_class: type[SD1UNet] | type[SDXLUNet],
) -> None:
    with torch.device("meta"):
        unet = unet_class(SD15_UNET if unet_class is SD1UNet else SDXL_BASE_UNET)
    expected_blocks = ldm_blocks(unet)
    paths = [p for p, m in unet.named_modules() if isinstance(m, (fl.Linear, fl.Conv2d))]
    assert len(expected_blocks) > 0.9 * len(paths)
    for short in (False, True):
        names = block_weight_names(unet, short=short)
        sizes = {(SD1UNet, False): 26, (SD1UNet, True): 17, (SDXLUNet, False): 20, (SDXLUNet, True): 12}
        assert len(names) == sizes[(unet_class, short)]
        values = [float(i + 2) for i in range(len(names))]
        if short:
            with pytest.raises(ValueError, match=r"layer `.*` is in block IN00, which the .*-value list leaves out"):
                block_multipliers(unet, paths, values, "LoRA 'style'")
            attention = [path for path in paths if expected_blocks.get(path) in names and path in expected_blocks]
            multipliers = block_multipliers(unet, attention, values, "LoRA 'style'")
            paths_and_multipliers = zip(attention, multipliers, strict=True)
        else:
            paths_and_multipliers = zip(paths, block_multipliers(unet, paths, values, "LoRA 'style'"), strict=True)
        for path, multiplier in paths_and_multipliers:
            expected = values[names.index(expected_blocks[path])] if path in expected_blocks else 1.0
            assert multiplier == expected, path


EXTENSION_PRESETS = """NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
"""sd-webui-lora-block-weight's default presets, as its scripts/lora_block_weight.py spells them (DEF_WEIGHT_PRESET)."""
EXTENSION_BLOCKS_17 = "BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11"
"""Its BLOCKID17: the blocks of a 17-value list, which its `to26` places by name, every other block taking 0."""


@pytest.mark.parametrize("unet_class", [SD1UNet, SDXLUNet])
@pytest.mark.parametrize("line", EXTENSION_PRESETS.splitlines(), ids=lambda line: line.split(":")[0])
def test_a_block_weight_preset_gives_each_layer_the_value_the_extension_gives_its_block(
    line: str, unet_class: type[SD1UNet] | type[SDXLUNet]
) -> None:
    with torch.device("meta"):
        unet = unet_class(SD15_UNET if unet_class is SD1UNet else SDXL_BASE_UNET)
    name, values = line.split(":")
    by_block: dict[str, float] = dict(zip(EXTENSION_BLOCKS_17.split(","), map(float, values.split(",")), strict=True))
    expected_blocks = ldm_blocks(unet)
    paths = [p for p, m in unet.named_modules() if isinstance(m, (fl.Linear, fl.Conv2d))]
    for path, multiplier in zip(paths, block_multipliers(unet, paths, name, "LoRA 'style'"), strict=True):
        expected = by_block.get(expected_blocks[path], 0.0) if path in expected_blocks else 1.0
        assert multiplier == expected, (path, expected_blocks.get(path))
    assert BLOCK_WEIGHT_PRESETS[name] == tuple(by_block.values())


def test_every_layer_of_sd15_and_sdxl_pipelines_has_a_block(
    references: DiffusersReferences, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sd15 = StableDiffusion_1.from_pretrained(references.folder)
    sdxl = StableDiffusion_XL.from_pretrained(write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl_blocks")))
    for model, components in ((sd15, {"unet", "text_encoder"}), (sdxl, {"unet", "text_encoder", "text_encoder_2"})):
        blocks = model.layer_blocks()
        for path, layer in model.named_modules():
            if isinstance(layer, (fl.Linear, fl.Conv2d)) and not path.startswith("lda."):
                assert path in blocks, path
        assert {block.component for block in blocks.values()} == components
        names = block_weight_names(model)
        paths = [path for path in blocks if isinstance(model.get_submodule(path), (fl.Linear, fl.Conv2d))]
        values = [float(i + 2) for i in range(len(names))]
        for path, multiplier in zip(paths, block_multipliers(model, paths, values, "LoRA 'x'"), strict=True):
            if blocks[path].component != "unet":
                assert multiplier == values[0], f"{path} is in BASE"
