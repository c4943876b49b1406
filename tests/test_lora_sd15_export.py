"""LoRAs created on a `StableDiffusion_1` with `LoraManager.create` and written in the kohya and diffusers layouts
load in diffusers' own `StableDiffusionPipeline.load_lora_weights` with the same UNet and text-encoder outputs; and a
LoRA written by diffusers / PEFT with alpha != rank (in its `lora_adapter_metadata`) loads with the right scale.

Tolerance: within 1e-4 of max |reference output| in fp32. Small configurations; every kind of layer a LoRA patches
is covered: attention projections, feed-forward, SD1's 1x1 convolution projections, LoCon 3x3 and 1x1 convolutions,
the time embedding, and the text encoder's attention and MLP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline  # type: ignore[import-untyped]
from peft import LoraConfig, get_peft_model_state_dict  # type: ignore[import-untyped]
from safetensors import safe_open

from refiners_core.module_names import DIFFUSERS
from refiners_core.testing import assert_relative_close
from refiners_lora import LoraManager
from refiners_lora.testing import randomize_loras
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import DiffusersReferences, paired_outputs

_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
UNET_MODULES = (
    "down_blocks.0.attentions.0.proj_in",  # a 1x1 convolution in diffusers, a Linear in ours
    f"{_BLOCK}.attn1.to_q",
    f"{_BLOCK}.attn2.to_k",
    f"{_BLOCK}.attn2.to_out.0",
    f"{_BLOCK}.ff.net.0.proj",
    "up_blocks.1.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",  # LoCon 3x3
    "up_blocks.0.resnets.0.conv_shortcut",  # LoCon 1x1
    "mid_block.resnets.0.time_emb_proj",
)
TEXT_MODULES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.0.mlp.fc1")
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_export"))


def assert_same_outputs(sd: StableDiffusion_1, pipe: StableDiffusionPipeline) -> None:
    """Our UNet and text encoder against the pipeline's, within 1e-4 of max |reference|."""
    ours_unet, their_unet, ours_text, their_text = paired_outputs(sd, pipe.unet, pipe.text_encoder, 64, PROMPT)
    for what, ours, theirs in (("unet", ours_unet, their_unet), ("text", ours_text, their_text)):
        assert_relative_close(ours, theirs, 1e-4, what=what)


def our_paths(sd: StableDiffusion_1) -> list[str]:
    names = sd.foreign_module_names(DIFFUSERS)
    unet = [names[f"unet.{module}"] for module in UNET_MODULES]
    return unet + [names[f"text_encoder.text_model.{module}"] for module in TEXT_MODULES]


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_a_created_lora_saved_for_diffusers_gives_the_same_outputs_there(
    lora_format: str, references: DiffusersReferences, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(references.folder)
    adapters = LoraManager(sd).create("style", our_paths(sd), rank=4, alpha=2.0)
    randomize_loras(adapters.values(), seed=1, std=0.2)
    path = tmp_path / "style.safetensors"
    LoraManager(sd).save("style", path, format=lora_format)  # type: ignore[arg-type]
    pipe = references.pipeline()
    with pytest.raises(AssertionError):  # the LoRA does change the outputs
        assert_same_outputs(sd, pipe)
    pipe.load_lora_weights(str(path))  # pyright: ignore[reportUnknownMemberType]
    assert_same_outputs(sd, pipe)


def test_a_peft_lora_saved_by_diffusers_with_alpha_in_its_metadata_loads_with_that_alpha(
    references: DiffusersReferences, tmp_path: Path
) -> None:
    pipe = references.pipeline()
    torch.manual_seed(1)
    unet_config = LoraConfig(
        r=4, lora_alpha=2, target_modules=list(UNET_MODULES), alpha_pattern={"proj_in": 12}, init_lora_weights=False
    )
    text_config = LoraConfig(r=2, lora_alpha=5, target_modules=list(TEXT_MODULES), init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)  # pyright: ignore[reportUnknownMemberType]
    pipe.text_encoder.add_adapter(text_config)  # pyright: ignore[reportUnknownMemberType]
    layers: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder),
        "unet_lora_adapter_metadata": unet_config.to_dict(),
        "text_encoder_lora_adapter_metadata": text_config.to_dict(),
    }
    StableDiffusionPipeline.save_lora_weights(tmp_path, **layers)  # pyright: ignore[reportUnknownMemberType]
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(path, framework="pt") as file:  # pyright: ignore[reportUnknownVariableType]
        assert "lora_adapter_metadata" in file.metadata()  # pyright: ignore[reportUnknownMemberType]
    sd = StableDiffusion_1.from_pretrained(references.folder)
    LoraManager(sd).add("peft", path)
    assert_same_outputs(sd, pipe)
