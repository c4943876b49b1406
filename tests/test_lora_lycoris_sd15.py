"""A kohya-named LyCORIS file mixing LoHa, LoKr (Tucker cores on 3x3 convolutions) and DoRA LoCon over every Linear
and Conv2d of the small SD1.5 UNet and text encoder, loaded by `LoraManager` onto a `StableDiffusion_1` read from a
diffusers folder.

The reference is the diffusers UNet and transformers text encoder with the `lycoris-lora` package's own modules
(`LohaModule`, `LokrModule`, `LoConModule(weight_decompose=True)`) applied to the same layers, holding the same
random weights that the file was written from (their `custom_state_dict`). Outputs agree within 1e-4 relative
(`assert_relative_close`), unfused and fused; `remove` restores the model bit for bit. The UNet also takes PEFT's
DoRA, LoHa and LoKr files (`get_peft_model_state_dict` keys, the alpha in `lora_adapter_metadata`), compared with
the PEFT-wrapped diffusers UNet.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from refiners_core.fluxion.adapters import Adapter
from refiners_core.testing import assert_relative_close, assert_state_unchanged, state_snapshot
from refiners_lora import LoraManager
from refiners_lora.testing import apply_lycoris, write_peft_file
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import DiffusersReferences, kohya_module_name, paired_outputs

PROMPT = "a photograph of an astronaut riding a horse"


def lycoris_references(references: DiffusersReferences, path: Path) -> tuple[dict[str, Any], list[Any]]:
    """Copies of the diffusers / transformers references with a LyCORIS module on every layer (their file at
    `path`), and those modules."""
    models = {"unet": copy.deepcopy(references.unet), "text_encoder": copy.deepcopy(references.text_encoder)}
    return models, apply_lycoris(models, kohya_module_name, path)


def outputs(sd: StableDiffusion_1, unet: Any, text_encoder: Any, cross_attention_dim: int) -> tuple[torch.Tensor, ...]:
    """(ours, reference) for the UNet on random latents, then for the text encoder on `PROMPT`."""
    return paired_outputs(sd, unet, text_encoder, cross_attention_dim, PROMPT)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_small"))


def test_a_kohya_loha_lokr_dora_file_matches_lycoris_on_the_sd15_unet_and_text_encoder(
    references: DiffusersReferences, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(references.folder)
    before = state_snapshot(sd)
    path = tmp_path / "lycoris.safetensors"
    models, modules = lycoris_references(references, path)
    width = references.cross_attention_dim
    plain = outputs(sd, references.unet, references.text_encoder, width)
    loras = LoraManager(sd)
    assert loras.add("style", path) == []
    assert sum(isinstance(layer, Adapter) for layer in sd.modules()) == len(modules)
    unet_ours, unet_theirs, text_ours, text_theirs = outputs(sd, models["unet"], models["text_encoder"], width)
    assert (unet_theirs - plain[1]).abs().max() > 1e-3 and (text_theirs - plain[3]).abs().max() > 1e-3
    assert_relative_close(unet_ours, unet_theirs, what="UNet, unfused")
    assert_relative_close(text_ours, text_theirs, what="text encoder, unfused")
    loras.fuse()
    unet_fused, _, text_fused, _ = outputs(sd, models["unet"], models["text_encoder"], width)
    assert_relative_close(unet_fused, unet_theirs, what="UNet, fused")
    assert_relative_close(text_fused, text_theirs, what="text encoder, fused")
    loras.unfuse()
    loras.remove("style")
    assert_state_unchanged(sd, before)


@pytest.mark.parametrize("family", ["dora", "loha", "lokr"])
def test_a_peft_dora_loha_or_lokr_unet_file_matches_peft_on_the_sd15_unet(
    family: str, references: DiffusersReferences, tmp_path: Path
) -> None:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # pyright: ignore[reportPrivateImportUsage]

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
    config: Any = {
        "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=True),
        "loha": lambda: LoHaConfig(r=3, alpha=5, target_modules=targets),
        "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=targets, decompose_factor=4),
    }[family]()
    reference: Any = get_peft_model(copy.deepcopy(references.unet), config).eval()
    write_peft_file(reference, config, tmp_path / "adapter_model.safetensors")
    sd = StableDiffusion_1.from_pretrained(references.folder)
    width = references.cross_attention_dim
    plain, _, _, _ = outputs(sd, references.unet, references.text_encoder, width)
    loras = LoraManager(sd)
    assert loras.add("style", tmp_path / "adapter_model.safetensors") == []
    ours, theirs, _, _ = outputs(sd, reference.base_model.model, references.text_encoder, width)
    assert (theirs - plain).abs().max() > 1e-3
    assert_relative_close(ours, theirs, what=f"PEFT {family} UNet, unfused")
    loras.fuse()
    fused, _, _, _ = outputs(sd, reference.base_model.model, references.text_encoder, width)
    assert_relative_close(fused, theirs, what=f"PEFT {family} UNet, fused")
