"""`StableDiffusion_XL.foreign_module_names` (the `ForeignModuleNames` protocol LoRA files go through): every Linear
and Conv2d of diffusers' `UNet2DConditionModel` and of transformers' two text encoders, named as diffusers / PEFT
and kohya files name them, leads to the layer of ours holding the same weights (small SDXL configs, random weights,
read from a diffusers folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS, KOHYA, ForeignModuleNames, ForeignPointwiseConvolutions
from refiners_sdxl import StableDiffusion_XL, StableDiffusion_XL_Refiner
from refiners_sdxl.testing import SMALL_UNET, sdxl_references

KOHYA_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return sdxl_references().save_folders(tmp_path_factory.mktemp("sdxl_names"))


def test_every_diffusers_and_transformers_module_maps_to_our_layer_with_its_weights(
    folders: tuple[Path, Path, Path],
) -> None:
    from diffusers import StableDiffusionXLPipeline  # pyright: ignore[reportPrivateImportUsage]

    base, _, _ = folders
    pipeline = StableDiffusionXLPipeline.from_pretrained(base)
    sdxl = StableDiffusion_XL.from_pretrained(base)
    assert isinstance(sdxl, ForeignModuleNames) and isinstance(sdxl, ForeignPointwiseConvolutions)
    diffusers, kohya = sdxl.foreign_module_names(DIFFUSERS), sdxl.foreign_module_names(KOHYA)
    layers = dict(sdxl.named_modules())
    checked = 0
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model: nn.Module = getattr(pipeline, component)
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv2d):
                continue
            paths = {diffusers[f"{component}.{name}"]}
            if component == "unet":
                paths |= {diffusers[name], kohya["lora_unet_" + name.replace(".", "_")]}
            else:  # as published files name them: with transformers 4.x's `text_model.` level
                published = (
                    name if name.startswith("text_model.") or name == "text_projection" else f"text_model.{name}"
                )
                paths |= {
                    diffusers[f"{component}.{published}"],
                    kohya[KOHYA_PREFIXES[component] + published.replace(".", "_")],
                }
            (path,) = paths
            layer = layers[path]
            assert isinstance(layer, fl.Linear | fl.Conv2d), path
            assert torch.equal(layer.weight.reshape(module.weight.shape), module.weight), path
            checked += 1
    assert checked > 100
    assert sdxl.foreign_pointwise_convolutions(DIFFUSERS) == set()  # SDXL's proj_in / proj_out are linear
    assert SMALL_UNET["use_linear_projection"]


def test_kohya_names_with_the_original_checkpoint_paths_lead_to_the_same_layers(
    folders: tuple[Path, Path, Path],
) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(folders[0])
    kohya = sdxl.foreign_module_names(KOHYA)
    # SMALL_UNET: one resnet per level and none attended on level 0: input block 3 holds the first attention
    assert kohya["lora_unet_input_blocks_3_1_proj_in"] == kohya["lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert kohya["lora_unet_middle_block_1_proj_out"] == kohya["lora_unet_mid_block_attentions_0_proj_out"]
    assert kohya["lora_unet_label_emb_0_0"] == kohya["lora_unet_add_embedding_linear_1"]
    assert sdxl.foreign_module_names("another") == {}


def test_the_refiner_names_its_clip_g_text_encoder_2(folders: tuple[Path, Path, Path]) -> None:
    refiner = StableDiffusion_XL_Refiner.from_pretrained(folders[2])
    diffusers, kohya = refiner.foreign_module_names(DIFFUSERS), refiner.foreign_module_names(KOHYA)
    name = "text_model.encoder.layers.0.self_attn.q_proj"
    assert diffusers[f"text_encoder_2.{name}"] == kohya[f"lora_te2_{name.replace('.', '_')}"]
    assert diffusers[f"text_encoder_2.{name}"].startswith("clip_text_encoder.")
    assert not any(key.startswith(("text_encoder.", "lora_te1_")) for key in (*diffusers, *kohya))
