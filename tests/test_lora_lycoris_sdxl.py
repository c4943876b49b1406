"""A kohya-named LyCORIS file mixing LoHa, LoKr (Tucker cores on 3x3 convolutions) and DoRA LoCon over every Linear
and Conv2d of the small SDXL UNet and both text encoders (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`), loaded by
`LoraManager` onto a `StableDiffusion_XL` read from a diffusers folder; and a diffusers-format PEFT DoRA file on the
UNet (`unet.` keys, `lora_magnitude_vector`).

References: `refiners_sdxl.testing`'s small diffusers UNet and transformers text encoders with the `lycoris-lora`
package's own modules applied to the same layers (`refiners_lora.testing.apply_lycoris`), or with PEFT's
`LoraConfig(use_dora=True)` injected. UNet output, text embedding and pooled embedding agree within 1e-4 relative
(`assert_relative_close`), unfused and fused; `remove` restores the model bit for bit.
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
from refiners_sdxl import StableDiffusion_XL
from refiners_sdxl.testing import (
    SDXLReferences,
    our_outputs,
    reference_outputs,
    sdxl_references,
    write_small_sdxl_folder,
)

PROMPT = "a photograph of an astronaut riding a horse"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
WHAT = ("UNet", "text embedding", "pooled embedding")


def kohya_name(component: str, name: str) -> str:
    """The kohya module name: published text-encoder files have transformers 4.x's `text_model.` level."""
    if component != "unet" and name != "text_projection":
        name = f"text_model.{name.removeprefix('text_model.')}"
    return (KOHYA_PREFIXES[component] + name).replace(".", "_")


def ours(sdxl: StableDiffusion_XL) -> list[torch.Tensor]:
    return our_outputs(sdxl, PROMPT)


def theirs(sdxl: StableDiffusion_XL, models: dict[str, Any]) -> list[torch.Tensor]:
    return reference_outputs(sdxl, models, PROMPT)


def assert_matches(mine: list[torch.Tensor], reference: list[torch.Tensor], how: str) -> None:
    for what, a, b in zip(WHAT, mine, reference, strict=True):
        assert_relative_close(a, b, what=f"{what}, {how}")


@pytest.fixture(scope="module")
def references() -> SDXLReferences:
    return sdxl_references()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl_lycoris"))


def copies(references: SDXLReferences) -> dict[str, Any]:
    return {name: copy.deepcopy(getattr(references, name)) for name in KOHYA_PREFIXES}


def test_a_kohya_loha_lokr_dora_file_matches_lycoris_on_the_sdxl_unet_and_both_text_encoders(
    references: SDXLReferences, folder: Path, tmp_path: Path
) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    before = state_snapshot(sdxl)
    plain = theirs(sdxl, copies(references))
    assert_matches(ours(sdxl), plain, "no LoRA")  # the folder holds the references' weights
    path = tmp_path / "lycoris.safetensors"
    models = copies(references)
    modules = apply_lycoris(models, kohya_name, path)
    families = {type(module).__name__ for module in modules}
    assert families == {"LohaModule", "LokrModule", "LoConModule"}
    assert any(getattr(module, "tucker", False) for module in modules)
    expected = theirs(sdxl, models)
    assert all((e - p).abs().max() > 1e-3 for e, p in zip(expected, plain, strict=True))  # the update is felt
    loras = LoraManager(sdxl)
    assert loras.add("style", path) == []  # every key used
    assert sum(isinstance(layer, Adapter) for layer in sdxl.modules()) == len(modules)
    assert_matches(ours(sdxl), expected, "unfused")
    loras.fuse()
    assert_matches(ours(sdxl), expected, "fused")
    loras.unfuse()
    loras.remove("style")
    assert_state_unchanged(sdxl, before)


def test_a_diffusers_peft_dora_unet_file_matches_peft_on_the_sdxl_unet(
    references: SDXLReferences, folder: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # pyright: ignore[reportPrivateImportUsage]

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=True)
    models = copies(references)
    models["unet"] = inject_adapter_in_model(config, models["unet"]).eval()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_peft_file(models["unet"], config, path, prefix="unet.")
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    plain = ours(sdxl)
    assert LoraManager(sdxl).add("style", path) == []
    expected = theirs(sdxl, models)
    assert (expected[0] - plain[0]).abs().max() > 1e-3
    assert_relative_close(ours(sdxl)[0], expected[0], what="PEFT DoRA UNet, unfused")
    LoraManager(sdxl).fuse()
    assert_relative_close(ours(sdxl)[0], expected[0], what="PEFT DoRA UNet, fused")
