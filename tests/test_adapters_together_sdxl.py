"""Adapters from separately installed packages on one SDXL (refiners-sdxl): a LoRA (refiners-lora), a ControlNet
(refiners-controlnet), a textual inversion (refiners-textual-inversion) and FreeU (refiners-freeu).

The LoRA is made with `LoraManager.create` on our SDXL layer paths (reading kohya and diffusers SDXL files is tested
in tests/test_lora_sdxl.py), its `up` weights drawn at random so that it changes the generation. The adapters go in
together, each changes the generation, and ejected in another order than they went in they give back the exact
original `state_dict` and the exact original latents (bit for bit, float32 on the CPU).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_controlnet import ControlNet, ControlNetAdapter
from refiners_core.testing import Original, outputs_after_each, randomize_parameters
from refiners_freeu import FreeU
from refiners_lora import LoraManager
from refiners_sd15 import DDIM
from refiners_sdxl import StableDiffusion_XL
from refiners_sdxl.testing import G_DIM, L_DIM, guided_latents, write_small_sdxl_folder
from refiners_textual_inversion import SDXLTextualInversion

SIZE = 64  # pixels: 8x8 latents
PROMPT = "a <toy> riding a horse"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def attention_projections(sdxl: StableDiffusion_XL) -> list[str]:
    """The paths of the Linear layers of every attention of the UNet and of both text encoders."""
    return [
        path
        for path, module in sdxl.named_modules()
        if isinstance(module, fl.Linear) and "Attention." in path and path.startswith(("unet.", "clip_text"))
    ]


def controlnet_for(sdxl: StableDiffusion_XL) -> ControlNet:
    """A ControlNet for the SDXL UNet, every parameter random so that its residuals are not zero."""
    controlnet = ControlNet.from_unet(sdxl.unet)
    randomize_parameters(controlnet, seed=2, std=0.1)
    return controlnet


def generate(sdxl: StableDiffusion_XL) -> tuple[torch.Tensor, torch.Tensor]:
    """The text embedding of `PROMPT` and the latents of a 2-step DDIM generation with guidance."""
    sdxl.solver = DDIM(num_inference_steps=2, **sdxl.solver_defaults)
    with torch.no_grad():
        embedding, pooled = sdxl.compute_clip_text_embedding(PROMPT, negative_text="blurry")
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        return embedding, guided_latents(sdxl, noise, embedding, pooled, size=SIZE, condition_scale=5.0)


def test_lora_controlnet_textual_inversion_and_freeu_on_sdxl_then_ejected_in_another_order(folder: Path) -> None:
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    sdxl.show_progress = False
    original = Original.of(sdxl, lambda: generate(sdxl))
    original_embedding, original_latents = original.outputs

    # In: LoRA, ControlNet, textual inversion, FreeU.
    loras = LoraManager(sdxl)
    layers = attention_projections(sdxl)
    assert any(path.startswith("unet.") for path in layers)
    assert any(path.startswith("clip_text_encoder.") for path in layers)
    torch.manual_seed(1)
    for adapter in loras.create("style", layers, rank=4, scale=0.8).values():
        with torch.no_grad():
            adapter.lora.up.weight.copy_(torch.randn_like(adapter.lora.up.weight) * 0.3)
    controlnet = ControlNetAdapter(sdxl.unet, controlnet_for(sdxl), scale=0.7)
    controlnet.set_condition(torch.rand(1, 3, SIZE, SIZE)).inject()
    textual_inversion = SDXLTextualInversion(sdxl.clip_text_encoder)
    torch.manual_seed(4)
    textual_inversion.add_embedding("<toy>", torch.randn(2, L_DIM), torch.randn(2, G_DIM))
    textual_inversion.inject()
    freeu = FreeU(sdxl.unet).inject()  # SDXL's factors

    embedding, latents = generate(sdxl)
    assert torch.isfinite(latents).all()
    assert not torch.allclose(embedding, original_embedding, atol=1e-3)
    assert not torch.allclose(latents, original_latents, atol=1e-3)

    # Each adapter on its own matters: taking one out changes the result again.
    steps = [freeu.eject, lambda: loras.remove("style"), controlnet.eject, textual_inversion.eject]
    latents_by_state = [latents, *outputs_after_each(lambda: generate(sdxl)[1], steps)]
    for before, after in itertools.pairwise(latents_by_state):
        assert not torch.allclose(before, after, atol=1e-4)

    # Out: FreeU, LoRA, ControlNet, textual inversion -- and everything is exactly as it was.
    assert loras.names == ()
    original.assert_restored(sdxl, lambda: generate(sdxl))
    assert torch.equal(latents_by_state[-1], original_latents)
