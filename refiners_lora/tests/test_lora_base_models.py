"""`refiners_lora.base_models`: a LoRA made for another base model is refused in one line naming both models, before
anything is applied, from its text-encoder prefixes or its cross-attention width; a file that gives no such clue is
left to the usual checks. The models are small Chains naming their layers the kohya and diffusers way."""

from __future__ import annotations

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.base_models import guess_base_model

ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


class TwoEncoderNet(fl.Chain):
    """A UNet cross-attention key taking `width`-wide text and one self-attention projection per text encoder,
    named as an SDXL (`lora_te1_`, `lora_te2_`, `text_encoder_2.`) or SD1.5 (`lora_te_`, `text_encoder.`) model."""

    def __init__(self, width: int, sdxl: bool) -> None:
        super().__init__(fl.Linear(width, 8), fl.Linear(4, 4), fl.Linear(4, 4))
        self.sdxl = sdxl

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        text = "text_model.encoder.layers.0.self_attn.q_proj"
        encoders = (
            {"text_encoder": "Linear_2", "text_encoder_2": "Linear_3"} if self.sdxl else {"text_encoder": "Linear_2"}
        )
        if convention == DIFFUSERS:
            return {f"unet.{ATTN2}": "Linear_1"} | {f"{component}.{text}": path for component, path in encoders.items()}
        if convention == KOHYA:
            kohya = (
                {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
                if self.sdxl
                else {"text_encoder": "lora_te_"}
            )
            names = {f"{kohya[component]}{text.replace('.', '_')}": path for component, path in encoders.items()}
            return {f"lora_unet_{ATTN2.replace('.', '_')}": "Linear_1"} | names
        return {}


def lora(module: str, suffixes: tuple[str, str], in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    return {
        f"{module}.{suffixes[0]}": torch.randn(2, in_features),
        f"{module}.{suffixes[1]}": torch.randn(out_features, 2),
    }


KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight")


@pytest.mark.parametrize("strict", [True, False])
def test_an_sd15_kohya_lora_given_to_sdxl_names_sd15_from_its_text_encoder_keys(strict: bool) -> None:
    net = TwoEncoderNet(64, sdxl=True)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    tensors = lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", KOHYA_SUFFIXES, 4, 4)
    with pytest.raises(WeightsError) as error:
        LoraManager(net).add("sd15", tensors, strict=strict)
    assert str(error.value) == (
        "LoRA state dict 'sd15' is a LoRA for SD1.5 (text-encoder modules 'lora_te_*'), but TwoEncoderNet is SDXL "
        "(text-encoder modules 'lora_te1_*', 'lora_te2_*'): nothing was loaded"
    )
    assert all(torch.equal(net.state_dict()[key], value) for key, value in before.items())
    assert LoraManager(net).names == () and not any(isinstance(layer, LoraAdapter) for layer in net.modules())


def test_an_sdxl_diffusers_lora_given_to_sd15_names_sdxl_from_its_text_encoder_2_keys() -> None:
    net = TwoEncoderNet(64, sdxl=False)
    tensors = lora("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", PEFT_SUFFIXES, 4, 4)
    with pytest.raises(
        WeightsError, match=r"is a LoRA for SDXL \(text-encoder modules 'text_encoder_2\.\*'\), not for"
    ):
        LoraManager(net).add("sdxl", tensors)


def test_a_published_cross_attention_width_names_the_model_of_a_unet_only_lora() -> None:
    net = TwoEncoderNet(768, sdxl=False)
    tensors = lora(f"unet.{ATTN2}", PEFT_SUFFIXES, 2048, 8)
    with pytest.raises(WeightsError) as error:
        LoraManager(net).add("sdxl", tensors)
    assert str(error.value) == (
        f"LoRA state dict 'sdxl' is a LoRA for SDXL ('unet.{ATTN2}' takes 2048-wide text embeddings), but "
        "TwoEncoderNet is SD1.5 (768-wide text embeddings): nothing was loaded"
    )


def test_a_width_of_no_published_model_is_left_to_the_shape_check() -> None:
    net = TwoEncoderNet(64, sdxl=False)
    with pytest.raises(WeightsError, match=r"has shape \(2, 48\) but layer .* expects \(2, 64\)"):
        LoraManager(net).add("other", lora(f"unet.{ATTN2}", PEFT_SUFFIXES, 48, 8))


def test_a_lora_of_the_same_model_loads() -> None:
    net = TwoEncoderNet(2048, sdxl=True)
    tensors = lora(f"lora_unet_{ATTN2.replace('.', '_')}", KOHYA_SUFFIXES, 2048, 8)
    tensors |= lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", KOHYA_SUFFIXES, 4, 4)
    assert LoraManager(net).add("sdxl", tensors) == []
    assert sum(isinstance(layer, LoraAdapter) for layer in net.modules()) == 2


def test_guess_base_model_reads_the_cross_attention_width_then_the_text_encoder_prefixes() -> None:
    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    sdxl_unet = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": meta(4, 2048)}
    assert guess_base_model(sdxl_unet) == (
        "SDXL",
        "'lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k' takes 2048-wide text embeddings",
    )
    assert guess_base_model({"lora_te_text_model_encoder_layers_0_mlp_fc1": meta(4, 768)}) == (
        "SD1.5",
        "text-encoder modules 'lora_te_*'",
    )
    assert guess_base_model({**sdxl_unet, "lora_te_text_model_encoder_layers_0_mlp_fc1": meta(4, 768)}) is None
    assert guess_base_model({"unet.down_blocks.0.resnets.0.conv1": meta(4, 320, 3, 3)}) is None
