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
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from refiners_core.fluxion.adapters import Adapter
from refiners_core.testing import assert_relative_close
from refiners_lora import LoraManager
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import DiffusersReferences

PROMPT = "a photograph of an astronaut riding a horse"


def kohya_name(component: str, name: str) -> str:
    """The kohya module name: published text-encoder files have transformers 4.x's `text_model.` level."""
    return ("lora_unet_" + name if component == "unet" else "lora_te_text_model." + name).replace(".", "_")


def lycoris_module(index: int, name: str, layer: nn.Linear | nn.Conv2d) -> Any:
    """LoHa, LoKr or DoRA LoCon in turn; Tucker cores where the kernel is larger than 1x1."""
    from lycoris.modules import LoConModule, LohaModule, LokrModule  # lycoris-lora: a test extra of refiners-lora

    if index % 3 == 0:
        return LohaModule(name, layer, lora_dim=2, alpha=1, use_tucker=True)
    if index % 3 == 1:
        return LokrModule(name, layer, lora_dim=2, alpha=3, factor=4, use_tucker=True)
    return LoConModule(name, layer, lora_dim=3, alpha=2, weight_decompose=True)


class LycorisReferences:
    """Copies of the diffusers / transformers references with a LyCORIS module on every layer, and their file."""

    def __init__(self, references: DiffusersReferences, path: Path) -> None:
        self.models = {"unet": copy.deepcopy(references.unet), "text_encoder": copy.deepcopy(references.text_encoder)}
        generator = torch.Generator().manual_seed(4)
        tensors: dict[str, torch.Tensor] = {}
        self.modules: list[Any] = []
        for index, (component, name, _) in enumerate(references.targets()):
            layer = self.models[component].get_submodule(name)
            module = lycoris_module(index, kohya_name(component, name), layer)
            with torch.no_grad():
                for parameter_name, parameter in module.named_parameters():
                    values = torch.randn(parameter.shape, generator=generator) * 0.2
                    parameter.copy_(values.abs() + 1.0 if "dora_scale" in parameter_name else values)
            module.eval().apply_to()
            self.modules.append(module)
            for key, tensor in module.custom_state_dict().items():
                tensors[f"{kohya_name(component, name)}.{key}"] = tensor.detach().clone().contiguous()
        save_file(tensors, path)


def outputs(sd: StableDiffusion_1, unet: Any, text_encoder: Any, width: int) -> tuple[torch.Tensor, ...]:
    """(ours, reference) for the UNet on random latents, then for the text encoder on a prompt."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, width, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        sd.unet.set_timestep(timestep)
        sd.unet.set_clip_text_embedding(text)
        tokens = sd.clip_text_encoder.tokenizer(PROMPT)
        return (
            sd.unet(latents),
            unet(latents, timestep, encoder_hidden_states=text).sample,
            sd.clip_text_encoder(tokens),
            text_encoder(tokens).last_hidden_state,
        )


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> DiffusersReferences:
    return DiffusersReferences(tmp_path_factory.mktemp("sd15_small"))


def test_a_kohya_loha_lokr_dora_file_matches_lycoris_on_the_sd15_unet_and_text_encoder(
    references: DiffusersReferences, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(references.folder)
    before = {key: tensor.clone() for key, tensor in sd.state_dict().items()}
    path = tmp_path / "lycoris.safetensors"
    lycoris = LycorisReferences(references, path)
    width = references.cross_attention_dim
    plain = outputs(sd, references.unet, references.text_encoder, width)
    loras = LoraManager(sd)
    assert loras.add("style", path) == []
    assert sum(isinstance(layer, Adapter) for layer in sd.modules()) == len(lycoris.modules)
    unet_ours, unet_theirs, text_ours, text_theirs = outputs(
        sd, lycoris.models["unet"], lycoris.models["text_encoder"], width
    )
    assert (unet_theirs - plain[1]).abs().max() > 1e-3 and (text_theirs - plain[3]).abs().max() > 1e-3
    assert_relative_close(unet_ours, unet_theirs, what="UNet, unfused")
    assert_relative_close(text_ours, text_theirs, what="text encoder, unfused")
    loras.fuse()
    unet_fused, _, text_fused, _ = outputs(sd, lycoris.models["unet"], lycoris.models["text_encoder"], width)
    assert_relative_close(unet_fused, unet_theirs, what="UNet, fused")
    assert_relative_close(text_fused, text_theirs, what="text encoder, fused")
    loras.unfuse()
    loras.remove("style")
    after = sd.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], value) for key, value in before.items())


@pytest.mark.parametrize("family", ["dora", "loha", "lokr"])
def test_a_peft_dora_loha_or_lokr_unet_file_matches_peft_on_the_sd15_unet(
    family: str, references: DiffusersReferences, tmp_path: Path
) -> None:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model, get_peft_model_state_dict  # pyright: ignore[reportPrivateImportUsage]

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
    config: Any = {
        "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=True),
        "loha": lambda: LoHaConfig(r=3, alpha=5, target_modules=targets),
        "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=targets, decompose_factor=4),
    }[family]()
    reference: Any = get_peft_model(copy.deepcopy(references.unet), config).eval()
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if any(part in name for part in ("lora_", "hada_", "lokr_")):
                values = torch.randn(parameter.shape, generator=generator) * 0.2
                parameter.copy_(values.abs() + 1.0 if "magnitude" in name else values)
    alpha = {"lora_alpha": 6} if family == "dora" else {"alpha": config.alpha}
    metadata = {"lora_adapter_metadata": json.dumps({"r": config.r, **alpha}), "format": "pt"}
    tensors = {key: tensor.contiguous() for key, tensor in get_peft_model_state_dict(reference).items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata=metadata)
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
