# pyright: reportPrivateImportUsage=false
"""`StableDiffusion_XL.from_single_file`: an original-layout SDXL checkpoint loads as the same model as the diffusers
folder of the same weights, its configs read from the tensors' shapes; SD1.5 checkpoints and refiners are refused.

The checkpoint is written from small diffusers/transformers references (random weights; heads of 64 channels and
256 features per time id, which the original layout does not store) through our original-layout mappings, which the
component tests check against diffusers' own single-file converters; CLIP-G in OpenCLIP's layout (fused attention
projections, transposed projection). The folder is written by `StableDiffusionXLPipeline.save_pretrained`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from refiners_core.state_dicts import compose, invert
from refiners_core.weights import save_tensors
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.autoencoder import diffusers_autoencoder_mapping, ldm_autoencoder_mapping
from refiners_sd15.testing import open_clip_state_dict
from refiners_sdxl import StableDiffusion_XL, diffusers_sdxl_unet_mapping, ldm_sdxl_unet_mapping

POOLED_DIM = 32
UNET: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "attention_head_dim": [1, 2],
    "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 64 + 128,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * 256,
}
VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "scaling_factor": 0.13025,
}
TEXT: dict[str, Any] = {"num_hidden_layers": 2, "max_position_embeddings": 77, "eos_token_id": 2}  # as published


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The diffusers folder and the single file of the same weights."""
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**UNET).eval(), AutoencoderKL(**VAE).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1, **TEXT)
    ).eval()
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=2,
            projection_dim=POOLED_DIM,
            hidden_act="gelu",
            **TEXT,
        )
    ).eval()
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        perturb(model, seed)
    folder = tmp_path_factory.mktemp("sdxl")
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),  # pyright: ignore[reportArgumentType]
        add_watermarker=False,
    ).save_pretrained(folder)

    loaded = StableDiffusion_XL.from_pretrained(folder)
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    checkpoint: dict[str, torch.Tensor] = {"denoiser.sigmas": torch.rand(1000)}  # beside the models, as published
    unet_keys = compose(
        ldm_sdxl_unet_mapping(loaded.unet.config), invert(diffusers_sdxl_unet_mapping(loaded.unet.config))
    )
    checkpoint |= {f"model.diffusion_model.{ldm}": unet_state[key] for ldm, key in unet_keys.items()}
    vae_keys = compose(
        ldm_autoencoder_mapping(loaded.lda.config), invert(diffusers_autoencoder_mapping(loaded.lda.config))
    )
    for ldm, key in vae_keys.items():
        tensor = vae_state[key]
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original stores these projections as 1x1 convolutions
        checkpoint[f"first_stage_model.{ldm}"] = tensor
    clip_l = {f"text_model.{key.removeprefix('text_model.')}": v for key, v in text_encoder.state_dict().items()}
    checkpoint |= {f"conditioner.embedders.0.transformer.{key}": value for key, value in clip_l.items()}  # as published
    open_clip = open_clip_state_dict(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers)
    checkpoint |= {f"conditioner.embedders.1.model.{key}": value for key, value in open_clip.items()}
    path = folder / "sd_xl_small.safetensors"
    save_tensors(path, {key: value.contiguous() for key, value in checkpoint.items()})
    return folder, path


def test_single_file_loads_as_the_diffusers_folder_of_the_same_weights(sources: tuple[Path, Path]) -> None:
    folder, path = sources
    expected = StableDiffusion_XL.from_pretrained(folder)
    loaded = StableDiffusion_XL.from_pretrained(path, dtype=torch.float64)

    # the first level has no attention: its transformer depth is not in the weights, and (1, 2) reads as 2
    assert loaded.unet.config == replace(expected.unet.config, transformer_layers_per_block=2)
    assert loaded.lda.config == expected.lda.config and loaded.lda.config.scaling_factor == 0.13025
    encoders = (loaded.clip_text_encoder, expected.clip_text_encoder)
    assert encoders[0].text_encoder_l.config == encoders[1].text_encoder_l.config
    assert encoders[0].text_encoder_g.config == encoders[1].text_encoder_g.config
    state, expected_state = loaded.state_dict(), expected.state_dict()
    assert set(state) == set(expected_state)
    assert all(tensor.dtype == torch.float64 for tensor in state.values())
    assert all(torch.equal(tensor, expected_state[key].double()) for key, tensor in state.items())


def test_an_sd15_checkpoint_is_refused_by_sdxl_and_an_sdxl_one_by_sd15(
    sources: tuple[Path, Path], tmp_path: Path
) -> None:
    _, path = sources
    with pytest.raises(ValueError, match=r"'conditioner\.embedders\..*' is an SDXL text encoder.*StableDiffusion_XL"):
        StableDiffusion_1.from_single_file(path)
    sd15 = tmp_path / "sd15.safetensors"
    save_tensors(sd15, {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)})
    with pytest.raises(ValueError, match=r"sd15\.safetensors: 'cond_stage_model\..*StableDiffusion_1"):
        StableDiffusion_XL.from_pretrained(sd15)


def test_a_refiner_checkpoint_is_refused_as_a_base(tmp_path: Path) -> None:
    refiner = tmp_path / "sd_xl_refiner.safetensors"
    save_tensors(refiner, {"conditioner.embedders.0.model.ln_final.weight": torch.ones(4)})
    with pytest.raises(ValueError, match=r"sd_xl_refiner\.safetensors: .* an SDXL refiner's only text encoder"):
        StableDiffusion_XL.from_pretrained(refiner)
