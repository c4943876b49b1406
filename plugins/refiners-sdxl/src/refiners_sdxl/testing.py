# pyright: reportPrivateImportUsage=false
"""Helpers for tests of refiners-sdxl and of the packages built on it: small SDXL-like diffusers configs (so that a
pipeline runs on CPU in seconds), SDXL's published scheduler config, random weights drawn per parameter, and
original-layout single-file checkpoints written from diffusers and transformers models. Nothing here is used at
runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refiners_core.state_dicts import compose, invert
from refiners_sd15.autoencoder import (
    autoencoder_config_from_diffusers,
    diffusers_autoencoder_mapping,
    ldm_autoencoder_mapping,
)
from refiners_sd15.testing import SD15_TEXT_ENCODER_CONFIG, open_clip_state_dict
from refiners_sd15.testing import SDXL_TEXT_ENCODER_2_CONFIG as PUBLISHED_TEXT_ENCODER_2_CONFIG
from refiners_sd15.unet import unet_config_from_diffusers
from refiners_sdxl.model import StableDiffusion_XL
from refiners_sdxl.refiner import StableDiffusion_XL_Refiner
from refiners_sdxl.unet import diffusers_sdxl_unet_mapping, ldm_sdxl_unet_mapping

TIME_ID_DIM = 8
"""Features per time id in the small UNets."""
L_DIM, G_DIM, POOLED_DIM = 32, 48, 40
"""Widths of the small CLIP-L-like and CLIP-G-like text encoders, and of CLIP-G's projected pooled embedding."""

SMALL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [1, 2],
    "transformer_layers_per_block": [1, 2],
    "norm_num_groups": 32,
    "cross_attention_dim": L_DIM + G_DIM,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": TIME_ID_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 6 * TIME_ID_DIM,
}
"""`UNet2DConditionModel` arguments of a small SDXL base-like UNet: two levels, attention on the second, CLIP-L + CLIP-G
text, the `text_time` added embedding of the pooled embedding and six time ids."""

SMALL_THREE_LEVEL_UNET: dict[str, Any] = {
    **SMALL_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [1, 2, 2],
    "transformer_layers_per_block": [1, 1, 2],
}
"""`SMALL_UNET` with SDXL base's three kinds of level: no attention and a downsampling, attention and a
downsampling, attention."""

SMALL_INPAINTING_UNET: dict[str, Any] = {**SMALL_UNET, "in_channels": 9}
"""`SMALL_UNET` with latents, mask and masked image latents in (4 + 1 + 4 channels)."""

SMALL_REFINER_UNET: dict[str, Any] = {
    **SMALL_UNET,
    "cross_attention_dim": G_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + 5 * TIME_ID_DIM,
}
"""`SMALL_UNET` as a refiner: CLIP-G text only, five time ids (with the aesthetic score)."""

SMALL_VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}
"""`AutoencoderKL` arguments of a small 4-level autoencoder with SDXL's latent scale (8x downscaling)."""

SMALL_TEXT: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77}
"""`CLIPTextConfig` arguments the small text encoders share."""
SMALL_TEXT_L: dict[str, Any] = {**SMALL_TEXT, "hidden_size": L_DIM, "intermediate_size": 64}
"""`CLIPTextConfig` arguments of a small CLIP-L-like `CLIPTextModel`."""
SMALL_TEXT_G: dict[str, Any] = {
    **SMALL_TEXT,
    "hidden_size": G_DIM,
    "intermediate_size": 96,
    "projection_dim": POOLED_DIM,
    "hidden_act": "gelu",
}
"""`CLIPTextConfig` arguments of a small CLIP-G-like `CLIPTextModelWithProjection`."""

SINGLE_FILE_POOLED_DIM = 32
"""Width of the projected pooled embedding of `SINGLE_FILE_TEXT_G`."""
SINGLE_FILE_UNET: dict[str, Any] = {
    **SMALL_UNET,
    "block_out_channels": [64, 128],
    "attention_head_dim": [1, 2],
    "cross_attention_dim": 64 + 128,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": SINGLE_FILE_POOLED_DIM + 6 * 256,
}
"""`SMALL_UNET` with what an original single file does not store but reads as SDXL's: heads of 64 channels, 256
features per time id, 32 normalisation groups; CLIP-L-like and CLIP-G-like text (`SINGLE_FILE_TEXT_L`, `_G`)."""
SINGLE_FILE_INPAINTING_UNET: dict[str, Any] = {**SINGLE_FILE_UNET, "in_channels": 9}
"""`SINGLE_FILE_UNET` with latents, mask and masked image latents in (4 + 1 + 4 channels)."""
SINGLE_FILE_REFINER_UNET: dict[str, Any] = {
    **SINGLE_FILE_UNET,
    "cross_attention_dim": 128,
    "projection_class_embeddings_input_dim": SINGLE_FILE_POOLED_DIM + 5 * 256,
}
"""`SINGLE_FILE_UNET` as a refiner: CLIP-G text only, five time ids (with the aesthetic score)."""
SINGLE_FILE_TEXT: dict[str, Any] = {"num_hidden_layers": 2, "max_position_embeddings": 77, "eos_token_id": 2}
"""`CLIPTextConfig` arguments the single-file text encoders share (eos_token_id 2, as published)."""
SINGLE_FILE_TEXT_L: dict[str, Any] = {
    **SINGLE_FILE_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 1,
}
"""`CLIPTextConfig` arguments of a CLIP-L-like `CLIPTextModel` with heads of 64 channels."""
SINGLE_FILE_TEXT_G: dict[str, Any] = {
    **SINGLE_FILE_TEXT,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "projection_dim": SINGLE_FILE_POOLED_DIM,
    "hidden_act": "gelu",
}
"""`CLIPTextConfig` arguments of a CLIP-G-like `CLIPTextModelWithProjection` with heads of 64 channels."""

SDXL_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `scheduler/scheduler_config.json` (the refiner's is the same)."""

SDXL_TOKENIZER_2_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
}  # fmt: skip
"""stabilityai/stable-diffusion-xl-base-1.0, `tokenizer_2/tokenizer_config.json` (CLIP-G's: pads with `!`)."""

SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `unet/config.json`."""

SDXL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `vae/config.json`."""

_METADATA = ("_name_or_path", "torch_dtype", "transformers_version")

SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {k: v for k, v in SD15_TEXT_ENCODER_CONFIG.items() if k not in _METADATA}
"""stabilityai/stable-diffusion-xl-base-1.0, `text_encoder/config.json` without its metadata (`_METADATA`): CLIP
ViT-L/14, SD1.5's text encoder."""

SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    k: v for k, v in PUBLISHED_TEXT_ENCODER_2_CONFIG.items() if k not in _METADATA
}
"""stabilityai/stable-diffusion-xl-base-1.0, `text_encoder_2/config.json` without its metadata: OpenCLIP
ViT-bigG/14's text model with its projection, a `CLIPTextModelWithProjection`."""


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter independently (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1)),
    so that no layer is an identity and a wrong weight mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith(".weight"):
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def random_diffusers_model(model_class: Any, config: dict[str, Any], seed: int) -> Any:
    """`model_class.from_config(config)` (a diffusers model class) built on the meta device, so without
    initialisation, then moved to the CPU with every parameter drawn by `randomize(model, seed)`, in eval mode."""
    with torch.device("meta"):
        model: torch.nn.Module = model_class.from_config(config)
    model = model.to_empty(device="cpu").eval()
    randomize(model, seed)
    return model


def small_sdxl_pipeline() -> Any:
    """A diffusers `StableDiffusionXLPipeline` of `sdxl_references()`'s base components (`SMALL_UNET`, `SMALL_VAE`,
    `SMALL_TEXT_L`, `SMALL_TEXT_G`, `SDXL_SCHEDULER`, no tokenizers: ours ship with refiners-sd15), progress bar off."""
    from diffusers import StableDiffusionXLPipeline

    # Any: diffusers types the **kwargs of its pipelines' methods (set_progress_bar_config...) as unknown
    pipeline: Any = StableDiffusionXLPipeline(**sdxl_references().components(), add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _save_pretrained(pipeline: Any, folder: Path) -> None:
    """`pipeline.save_pretrained(folder)` for a diffusers pipeline (Any: diffusers types its **kwargs as unknown)."""
    pipeline.save_pretrained(folder)


def write_small_sdxl_folder(folder: Path) -> Path:
    """Save `small_sdxl_pipeline()` as a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    `text_encoder_2/`, `scheduler/`) in `folder`, and return it."""
    small_sdxl_pipeline().save_pretrained(folder)
    return folder


@dataclass
class SDXLReferences:
    """diffusers and transformers models of an SDXL base, its inpainting model and its refiner, sharing their
    autoencoder and text encoders (see `sdxl_references`)."""

    unet: Any
    inpainting_unet: Any
    refiner_unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any

    def components(self, **changes: Any) -> dict[str, Any]:
        """Keyword arguments of diffusers' SDXL pipelines: the base UNet, the shared autoencoder and text encoders,
        an `EulerDiscreteScheduler` of `SDXL_SCHEDULER`, no tokenizers (ours ship with refiners-sd15); `changes`
        replace some."""
        from diffusers import EulerDiscreteScheduler

        scheduler_class: Any = EulerDiscreteScheduler  # diffusers types from_config's **kwargs as unknown
        components: dict[str, Any] = {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "unet": self.unet,
            "scheduler": scheduler_class.from_config(SDXL_SCHEDULER),
            "tokenizer": None,
            "tokenizer_2": None,
        }
        return components | changes

    def save_folders(self, root: Path) -> tuple[Path, Path, Path]:
        """Save the base (`StableDiffusionXLPipeline`), inpainting (`StableDiffusionXLInpaintPipeline`) and refiner
        (`StableDiffusionXLImg2ImgPipeline` without `text_encoder`, with aesthetic scores) as diffusers folders
        `root/base`, `root/inpainting` and `root/refiner`, and return them."""
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

        base, inpainting, refiner = root / "base", root / "inpainting", root / "refiner"
        _save_pretrained(StableDiffusionXLPipeline(**self.components(), add_watermarker=False), base)
        _save_pretrained(
            StableDiffusionXLInpaintPipeline(**self.components(unet=self.inpainting_unet), add_watermarker=False),
            inpainting,
        )
        _save_pretrained(
            StableDiffusionXLImg2ImgPipeline(
                **self.components(unet=self.refiner_unet, text_encoder=None),
                requires_aesthetics_score=True,
                add_watermarker=False,
            ),
            refiner,
        )
        return base, inpainting, refiner


def sdxl_references(
    unet: dict[str, Any] = SMALL_UNET,
    inpainting_unet: dict[str, Any] = SMALL_INPAINTING_UNET,
    refiner_unet: dict[str, Any] = SMALL_REFINER_UNET,
    text_encoder: dict[str, Any] = SMALL_TEXT_L,
    text_encoder_2: dict[str, Any] = SMALL_TEXT_G,
) -> SDXLReferences:
    """`SDXLReferences` of these `UNet2DConditionModel` and `CLIPTextConfig` arguments and `SMALL_VAE`, every
    parameter drawn by `randomize` with fixed seeds, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    references = SDXLReferences(
        unet=UNet2DConditionModel(**unet).eval(),
        inpainting_unet=UNet2DConditionModel(**inpainting_unet).eval(),
        refiner_unet=UNet2DConditionModel(**refiner_unet).eval(),
        vae=AutoencoderKL(**SMALL_VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_2)).eval(),
    )
    models = ("unet", "vae", "text_encoder", "text_encoder_2", "inpainting_unet", "refiner_unet")
    for seed, name in enumerate(models):
        randomize(getattr(references, name), seed)
    return references


def original_layout_checkpoint(
    unet: Any, vae: Any, text_encoder_2: Any, text_encoder: Any | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of an original single-file checkpoint holding diffusers' `unet` and `vae` and transformers'
    text encoders, renamed through our original-layout mappings (which the component tests check against diffusers'
    own converters): `model.diffusion_model.*`, `first_stage_model.*` (the mid-block attention projections as 1x1
    convolutions), `denoiser.sigmas`, and either a base model's CLIP-L `conditioner.embedders.0.transformer.*` and
    OpenCLIP-layout CLIP-G `conditioner.embedders.1.model.*`, or, without `text_encoder`, a refiner's CLIP-G alone,
    `conditioner.embedders.0.model.*`."""
    unet_config = unet_config_from_diffusers(dict(unet.config))
    vae_config = autoencoder_config_from_diffusers(dict(vae.config))
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    checkpoint: dict[str, torch.Tensor] = {"denoiser.sigmas": torch.rand(1000)}  # beside the models, as published
    unet_keys = compose(ldm_sdxl_unet_mapping(unet_config), invert(diffusers_sdxl_unet_mapping(unet_config)))
    checkpoint |= {f"model.diffusion_model.{ldm}": unet_state[key] for ldm, key in unet_keys.items()}
    vae_keys = compose(ldm_autoencoder_mapping(vae_config), invert(diffusers_autoencoder_mapping(vae_config)))
    for ldm, key in vae_keys.items():
        tensor = vae_state[key]
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original stores these projections as 1x1 convolutions
        checkpoint[f"first_stage_model.{ldm}"] = tensor
    open_clip = open_clip_state_dict(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers)
    clip_g_prefix = "conditioner.embedders.1.model." if text_encoder is not None else "conditioner.embedders.0.model."
    checkpoint |= {clip_g_prefix + key: value for key, value in open_clip.items()}
    if text_encoder is not None:
        clip_l = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
        checkpoint |= {f"conditioner.embedders.0.transformer.text_model.{key}": value for key, value in clip_l.items()}
    return {key: value.contiguous() for key, value in checkpoint.items()}


def write_small_sdxl_refiner_folder(folder: Path) -> Path:
    """Save a small SDXL refiner as a diffusers folder in `folder` (a `StableDiffusionXLImg2ImgPipeline` of
    `SMALL_REFINER_UNET`, randomized with its own seed, and `small_sdxl_pipeline()`'s autoencoder, CLIP-G-like text
    encoder and scheduler; no `text_encoder`, aesthetic-score time ids), and return it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = small_sdxl_pipeline()
    unet = UNet2DConditionModel(**SMALL_REFINER_UNET).eval()
    randomize(unet, 4)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,  # pyright: ignore[reportArgumentType]
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,  # pyright: ignore[reportArgumentType]
        tokenizer_2=None,  # pyright: ignore[reportArgumentType]
        unet=unet,
        scheduler=base.scheduler,
        requires_aesthetics_score=True,
        add_watermarker=False,
    )
    _save_pretrained(refiner, folder)
    return folder


def write_published_sdxl_folder(folder: Path, *, seed: int = 0) -> Path:
    """Write a diffusers `StableDiffusionXLPipeline` folder of the published SDXL base architecture with random weights
    (`randomize`) into `folder`, float32, as the published repository lays it out: `model_index.json`, `unet/`,
    `vae/`, `text_encoder/`, `text_encoder_2/` (one safetensors file each, not sharded) and `scheduler/`; the
    tokenizers are left out (`null` in `model_index.json`: ours ship with refiners-sd15). About 14 GB.

    One component is built, written and freed at a time: the peak memory is the UNet's, about 10 GB. Returns `folder`.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def without_metadata(config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items() if not key.startswith("_")}

    def diffusers_model(model_class: Any, config: dict[str, Any]) -> torch.nn.Module:
        with torch.device("meta"):  # no initialisation: `randomize` draws every parameter
            model: torch.nn.Module = model_class(**without_metadata(config))
        if next(model.buffers(), None) is not None:
            raise RuntimeError(f"{type(model).__name__} has buffers, which `to_empty` would leave uninitialised")
        return model.to_empty(device="cpu")

    folder.mkdir(parents=True, exist_ok=True)
    writers: list[tuple[str, Any]] = [
        ("unet", lambda: diffusers_model(UNet2DConditionModel, SDXL_BASE_UNET_CONFIG)),
        ("vae", lambda: diffusers_model(AutoencoderKL, SDXL_VAE_CONFIG)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG))),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))),
    ]
    for index, (name, build) in enumerate(writers):
        model = build()
        randomize(model, seed + index)
        model.save_pretrained(folder / name, safe_serialization=True, max_shard_size="20GB")
        del model
    scheduler: Any = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)  # pyright: ignore[reportUnknownMemberType]
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def prompt_arguments(embedding: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our text and pooled embeddings (negative first, as `compute_clip_text_embedding` returns them) as the keyword
    arguments of a diffusers SDXL pipeline call."""
    return {
        "prompt_embeds": embedding[1:],
        "negative_prompt_embeds": embedding[:1],
        "pooled_prompt_embeds": pooled[1:],
        "negative_pooled_prompt_embeds": pooled[:1],
    }


def guided_pipeline_arguments(
    embedding: torch.Tensor, pooled: torch.Tensor, *, steps: int, guidance_scale: float, size: int
) -> dict[str, Any]:
    """Keyword arguments of a diffusers SDXL pipeline call that matches `guided_latents`: our text and pooled
    embeddings (negative first, as `compute_clip_text_embedding` returns them), `steps` steps with classifier-free
    guidance of `guidance_scale`, a `size` x `size` image, latents out. Add `latents` (and the adapter's inputs)."""
    return {
        **prompt_arguments(embedding, pooled),
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "height": size,
        "width": size,
        "output_type": "latent",
    }


def guided_latents(
    sdxl: StableDiffusion_XL,
    noise: torch.Tensor,
    embedding: torch.Tensor,
    pooled: torch.Tensor,
    *,
    size: int,
    condition_scale: float,
) -> torch.Tensor:
    """Our denoising loop: every step of `sdxl.solver` from `noise`, with classifier-free guidance of
    `condition_scale` and the time ids of a `size` x `size` image (original and target size, no crop). Returns the
    final latents, to compare with a diffusers pipeline called with `guided_pipeline_arguments`."""
    x = sdxl.init_latents(size=(size, size), noise=noise)
    time_ids = sdxl.time_ids(original_size=(size, size), target_size=(size, size))
    return guided_steps(sdxl, x, embedding, pooled, time_ids, condition_scale=condition_scale)


def guided_steps(
    sdxl: StableDiffusion_XL | StableDiffusion_XL_Refiner,
    x: torch.Tensor,
    embedding: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    *,
    condition_scale: float = 5.0,
) -> torch.Tensor:
    """The latents `x` after every step of `sdxl.solver` (a base model's or a refiner's), with classifier-free
    guidance of `condition_scale` and the micro-conditioning `time_ids`. Written out, not `refiners_sd15.generation`'s
    `denoise`, so that tests of what runs that loop compare with one of their own."""
    for step in sdxl.steps:
        x = sdxl(
            x,
            step=step,
            clip_text_embedding=embedding,
            pooled_text_embedding=pooled,
            time_ids=time_ids,
            condition_scale=condition_scale,
        )
    return x


def _parity_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (8x8), text and pooled embeddings drawn from seed 3, the time ids of a 64x64 image, timestep 500."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, L_DIM + G_DIM, generator=generator)
    pooled = torch.randn(1, POOLED_DIM, generator=generator)
    return latents, text, pooled, torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]), torch.tensor([500])


@torch.no_grad()
def our_outputs(sdxl: StableDiffusion_XL, prompt: str) -> list[torch.Tensor]:
    """The small SDXL's UNet output on seeded random inputs (timestep 500), then the text and pooled embeddings of
    `prompt`: what `reference_outputs` gives from diffusers and transformers models, for parity tests of adapters
    patching the UNet and both text encoders."""
    latents, text, pooled, time_ids, timestep = _parity_inputs()
    unet = sdxl.unet
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    unet.set_pooled_text_embedding(pooled)
    unet.set_time_ids(time_ids)
    embedding, pooled_embedding = sdxl.clip_text_encoder(prompt)
    return [unet(latents), embedding, pooled_embedding]


@torch.no_grad()
def reference_outputs(sdxl: StableDiffusion_XL, models: dict[str, Any], prompt: str) -> list[torch.Tensor]:
    """What `our_outputs` gives, from `models` (`unet`, `text_encoder`, `text_encoder_2`: diffusers' UNet and
    transformers' text encoders, on our tokenizers' ids): the penultimate hidden states of both encoders,
    concatenated, and CLIP-G's projected pooled embedding."""
    latents, text, pooled, time_ids, timestep = _parity_inputs()
    added = {"text_embeds": pooled, "time_ids": time_ids}
    unet = models["unet"](latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample
    encoders = sdxl.clip_text_encoder
    ids_l, ids_g = encoders.text_encoder_l.tokenizer(prompt), encoders.text_encoder_g.tokenizer(prompt)
    hidden_l = models["text_encoder"](ids_l, output_hidden_states=True).hidden_states[-2]
    output_g = models["text_encoder_2"](ids_g, output_hidden_states=True)
    return [unet, torch.cat([hidden_l, output_g.hidden_states[-2]], dim=-1), output_g.text_embeds]


def ddim_pipeline_components(pipeline: Any) -> dict[str, Any]:
    """The components of the diffusers SDXL `pipeline`, its scheduler made DDIM without sample clipping (what our DDIM
    solver with SDXL's settings reproduces), to build an adapter's pipeline on. Needs diffusers (test extra)."""
    from diffusers import DDIMScheduler  # pyright: ignore[reportPrivateImportUsage]

    components = dict(pipeline.components)
    components["scheduler"] = DDIMScheduler.from_config(components["scheduler"].config, clip_sample=False)  # pyright: ignore[reportUnknownMemberType]
    return components


@torch.no_grad()
def assert_adapted_steps_match_pipeline(
    sdxl: StableDiffusion_XL,
    pipeline: Any,
    *,
    image: Any,
    scale_argument: str,
    scale: Any,
    off: Any,
    steps: int,
    guidance: float,
    size: int,
) -> None:
    """Compare `guided_latents` of `sdxl` (its adapters injected, its solver set) with the diffusers SDXL adapter
    `pipeline` (the same adapters) called through `guided_pipeline_arguments` with `image` and `scale_argument=scale`:
    both from seed 7 noise and the embeddings of "a cute cat", negative "blurry". Asserts first that the adapters steer
    the reference (with `scale_argument=off` its latents move by more than 1% of their magnitude), then that ours are
    within 1e-3 of max |reference|."""
    from refiners_core.testing import assert_relative_close

    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(7))
    pipeline.set_progress_bar_config(disable=True)
    arguments = guided_pipeline_arguments(embedding, pooled, steps=steps, guidance_scale=guidance, size=size)
    arguments["image"] = image
    expected: torch.Tensor = pipeline(**arguments, **{scale_argument: scale}, latents=noise.clone()).images
    without: torch.Tensor = pipeline(**arguments, **{scale_argument: off}, latents=noise.clone()).images
    assert (expected - without).abs().max() > 1e-2 * without.abs().max()  # the adapters do steer the generation

    x = guided_latents(sdxl, noise, embedding, pooled, size=size, condition_scale=guidance)
    assert_relative_close(x, expected, 1e-3)
