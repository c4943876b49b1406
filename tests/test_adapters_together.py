"""Adapters from separately installed packages on one SD1.5: a LoRA file (refiners-lora), a ControlNet
(refiners-controlnet), a textual inversion (refiners-textual-inversion), FreeU (refiners-freeu), a T2I-Adapter
(refiners-t2i-adapter) and an IP-Adapter (refiners-ip-adapter).

They go in together, each changes the generation, and ejected in another order than they went in they give back
the exact original `state_dict` and the exact original latents (bit for bit, float32 on the CPU).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import refiners_core.fluxion as fl
from refiners_controlnet import ControlNet, ControlNetAdapter
from refiners_core.module_names import DIFFUSERS
from refiners_core.testing import Original, outputs_after_each, randomize_parameters
from refiners_freeu import FreeU
from refiners_lora import LoraManager
from refiners_sd15 import DDIM, StableDiffusion_1
from refiners_sd15.testing import SMALL_CLIP_TRANSFORMERS_CONFIG, DiffusersReferences
from refiners_t2i_adapter import T2IAdapter, T2IAdapterConfig, T2IAdapterModel
from refiners_textual_inversion import TextualInversionAdapter

SIZE = (16, 16)  # pixels, and latents: the small autoencoder does not downscale
CONDITION_SIZE = (128, 128)  # the ControlNet and T2I-Adapter condition images, 8x the latents
PROMPT = "a <toy> riding a horse"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SD1.5-shaped diffusers folder with random weights."""
    return DiffusersReferences(tmp_path_factory.mktemp("sd15")).folder


def lora_file(sd: StableDiffusion_1, folder: Path) -> Path:
    """A diffusers / PEFT LoRA file of rank 4 on every UNet attention projection and text encoder q/v projection."""
    torch.manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, path in sd.foreign_module_names(DIFFUSERS).items():
        if not name.startswith(("unet.", "text_encoder.text_model.")):
            continue  # the same layers under their other accepted names
        wanted = (".to_q", ".to_k", ".to_v") if name.startswith("unet.") else (".q_proj", ".v_proj")
        layer = sd.get_submodule(path)
        if name.endswith(wanted) and isinstance(layer, fl.Linear):
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, layer.in_features) * 0.3
            tensors[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 4) * 0.3
    assert any(key.startswith("unet.") for key in tensors) and any(key.startswith("text_encoder.") for key in tensors)
    path = folder / "lora.safetensors"
    save_file(tensors, path)
    return path


def controlnet_for(sd: StableDiffusion_1) -> ControlNet:
    """A ControlNet for the UNet, with every parameter random so that its residuals are not zero."""
    controlnet = ControlNet.from_unet(sd.unet)
    randomize_parameters(controlnet, seed=2, std=0.1)
    return controlnet


def generate(sd: StableDiffusion_1) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embedding of `PROMPT` and the latents of a 2-step DDIM generation with guidance."""
    sd.solver = DDIM(num_inference_steps=2)
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPT, negative_text="blurry")
        x = sd.init_latents(size=SIZE, seed=3)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return embedding, x


def add_lora_controlnet_and_textual_inversion(
    sd: StableDiffusion_1, folder: Path
) -> tuple[LoraManager, ControlNetAdapter, TextualInversionAdapter]:
    """Into `sd`: the LoRA of `lora_file` (written in `folder`) at scale 0.8, a random ControlNet at scale 0.7 on a
    random condition, and a random 2-vector embedding of `<toy>`."""
    loras = LoraManager(sd)
    loras.add("style", lora_file(sd, folder), scale=0.8)
    controlnet = ControlNetAdapter(sd.unet, controlnet_for(sd), scale=0.7)
    controlnet.set_condition(torch.rand(1, 3, *CONDITION_SIZE)).inject()
    textual_inversion = TextualInversionAdapter(sd.clip_text_encoder)
    torch.manual_seed(4)
    textual_inversion.add_embedding("<toy>", torch.randn(2, SMALL_CLIP_TRANSFORMERS_CONFIG["hidden_size"]))
    textual_inversion.inject()
    return loras, controlnet, textual_inversion


def test_lora_controlnet_textual_inversion_freeu_and_t2i_adapter_together_then_ejected_in_another_order(
    folder: Path, tmp_path: Path
) -> None:
    sd = StableDiffusion_1.from_pretrained(folder)
    sd.show_progress = False
    original = Original.of(sd, lambda: generate(sd))
    original_embedding, original_latents = original.outputs

    # In: LoRA, ControlNet, textual inversion, FreeU, T2I-Adapter.
    loras, controlnet, textual_inversion = add_lora_controlnet_and_textual_inversion(sd, tmp_path)
    freeu = FreeU(sd.unet, s1=0.9, s2=0.2, b1=1.2, b2=1.4).inject()
    torch.manual_seed(5)  # a full adapter of the small UNet's levels: features of 32 and 64 channels
    t2i = T2IAdapter(sd.unet, T2IAdapterModel(T2IAdapterConfig(channels=(32, 64), num_res_blocks=1)), scale=0.6)
    t2i.set_condition(torch.rand(1, 3, *CONDITION_SIZE)).inject()

    embedding, latents = generate(sd)
    assert embedding.shape == original_embedding.shape and latents.shape == original_latents.shape
    assert torch.isfinite(latents).all()
    assert not torch.allclose(embedding, original_embedding, atol=1e-3)
    assert not torch.allclose(latents, original_latents, atol=1e-3)

    # Each adapter on its own matters: taking one out changes the result again.
    steps = [controlnet.eject, t2i.eject, lambda: loras.remove("style"), freeu.eject, textual_inversion.eject]
    latents_by_state = [latents, *outputs_after_each(lambda: generate(sd)[1], steps)]
    for before, after in itertools.pairwise(latents_by_state):
        assert not torch.allclose(before, after, atol=1e-4)

    # Out: ControlNet, T2I-Adapter, LoRA, FreeU, textual inversion -- and everything is exactly as it was.
    assert loras.names == ()
    original.assert_restored(sd, lambda: generate(sd))
    assert torch.equal(latents_by_state[-1], original_latents)


def test_ip_adapter_with_t2i_adapter_lora_controlnet_and_textual_inversion_then_ejected_in_another_order(
    folder: Path, tmp_path: Path
) -> None:
    """An IP-Adapter (refiners-ip-adapter, released layout, Plus kind) joins a T2I-Adapter, a LoRA, a ControlNet and
    a textual inversion on one UNet (the IP-Adapter and the LoRA on the cross-attentions they share); out in another
    order, everything is exactly as it was."""
    from refiners_clip_vision.testing import SMALL_VIT_H
    from refiners_ip_adapter import IPAdapter, text_cross_attentions
    from refiners_ip_adapter.testing import released_weights, write_release_folder

    sd = StableDiffusion_1.from_pretrained(folder)
    sd.show_progress = False
    original = Original.of(sd, lambda: generate(sd))
    original_latents = original.outputs[1]
    weights = released_weights(
        "perceiver",
        image_embedding_dim=SMALL_VIT_H.embedding_dim,
        cross_attention_dim=SMALL_CLIP_TRANSFORMERS_CONFIG["hidden_size"],
        inner_dims=[attention.inner_dim for attention in text_cross_attentions(sd.unet)],
        num_tokens=16,
    )
    path = write_release_folder(tmp_path / "ip", "ip-adapter.bin", weights, SMALL_VIT_H)
    reference = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())

    # In: IP-Adapter, LoRA, ControlNet, textual inversion.
    ip_adapter = IPAdapter.from_pretrained(sd.unet, path, scale=0.7).inject()
    ip_adapter.set_image_embedding(ip_adapter.compute_image_embedding(reference))
    with_ip_adapter = generate(sd)[1]
    assert not torch.allclose(with_ip_adapter, original_latents, atol=1e-3)
    loras, controlnet, textual_inversion = add_lora_controlnet_and_textual_inversion(sd, tmp_path)
    without_t2i = generate(sd)[1]
    torch.manual_seed(5)  # a full adapter of the small UNet's levels: features of 32 and 64 channels
    t2i = T2IAdapter(sd.unet, T2IAdapterModel(T2IAdapterConfig(channels=(32, 64), num_res_blocks=1)), scale=0.6)
    t2i.set_condition(torch.rand(1, 3, *CONDITION_SIZE)).inject()
    all_in = generate(sd)[1]
    assert not torch.allclose(all_in, without_t2i, atol=1e-4)

    # Out: LoRA, IP-Adapter (which mattered), ControlNet, T2I-Adapter, textual inversion.
    loras.remove("style")
    without_lora = generate(sd)[1]
    ip_adapter.eject()
    assert not torch.allclose(generate(sd)[1], without_lora, atol=1e-4)
    controlnet.eject()
    t2i.eject()
    textual_inversion.eject()
    assert not torch.allclose(all_in, original_latents, atol=1e-3)
    original.assert_restored(sd, lambda: generate(sd))
