"""Helpers for tests of refiners-sd15 and of the packages built on it: small SD1.5 components with random weights,
and original-layout checkpoints written from transformers state dicts. Nothing here is used at runtime."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from refiners_core.fluxion.utils import manual_seed
from refiners_sd15.autoencoder import SD15_AUTOENCODER, SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_sd15.model import StableDiffusion_1
from refiners_sd15.solvers import DDIM
from refiners_sd15.unet import SD1UNet, UNetConfig

SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}
"""runwayml/stable-diffusion-v1-5, `text_encoder/config.json`, as published: openai/clip-vit-large-patch14's text
model, the reference of the CLIP-L parity tests."""

SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}
"""stabilityai/stable-diffusion-xl-base-1.0, `text_encoder_2/config.json`, as published: OpenCLIP ViT-bigG/14's text
model (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k). Its `text_encoder/config.json` is `SD15_TEXT_ENCODER_CONFIG`."""

_OPEN_CLIP_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""`unet/config.json` of stable-diffusion-v1-5 as published: diffusers references of parity tests and benches are
built from it."""

SD15_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
}
"""`vae/config.json` of stable-diffusion-v1-5 as published."""


SMALL_THREE_LEVEL_UNET_DIFFUSERS_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "attention_head_dim": 4,
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 24,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""A small SD1-like UNet as a diffusers config: `SD15_UNET_CONFIG` with three levels of 32, 64 and 64 channels,
cross-attention (24-wide text) on the first two, as in SD1.5."""

SMALL_UNET_DIFFUSERS_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,  # the text encoder's width, so that `refiners generate` runs on the folder
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
"""A scaled-down SD1.5 UNet as a diffusers `UNet2DConditionModel` config (two levels of 32 and 64 channels)."""

SMALL_CLIP_TRANSFORMERS_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
"""A scaled-down CLIP-L text encoder as a transformers `CLIPTextConfig` (64 wide, two layers)."""

SMALL_VAE_DIFFUSERS_CONFIG: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
"""A scaled-down SD1.5 autoencoder as a diffusers `AutoencoderKL` config (one level of 32 channels)."""


SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
"""The noise schedule of stable-diffusion-v1-5's `scheduler/scheduler_config.json` (scaled-linear betas, timesteps
offset by one), as keyword arguments of diffusers schedulers: the schedule our solvers follow by default."""


def diffusers_reference_scheduler(name: str, **config: Any) -> Any:
    """The diffusers scheduler that our solver `name` ("ddim", "dpm" or "euler") reproduces with its defaults:
    `SD15_SCHEDULER_CONFIG`, and for DDIM no sample clipping and `set_alpha_to_one=False`; `config` adds fields.
    Needs diffusers (test extra). Raises ValueError for another name."""
    from diffusers import (
        DDIMScheduler,  # pyright: ignore[reportPrivateImportUsage]
        DPMSolverMultistepScheduler,  # pyright: ignore[reportPrivateImportUsage]
        EulerDiscreteScheduler,  # pyright: ignore[reportPrivateImportUsage]
    )

    if name == "ddim":
        return DDIMScheduler(**SD15_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False, **config)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG, **config)
    if name == "euler":
        return EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG, **config)
    raise ValueError(f"no diffusers reference scheduler for solver {name!r}: expected 'ddim', 'dpm' or 'euler'")


def kohya_module_name(component: str, name: str) -> str:
    """The kohya key prefix of module `name` (a diffusers / transformers module path) of `component` ("unet" or
    "text_encoder"), as published SD1.5 files write it: `lora_unet_...`, `lora_te_text_model_...` (transformers 4.x's
    `text_model.` level)."""
    return ("lora_unet_" + name if component == "unet" else "lora_te_text_model." + name).replace(".", "_")


class DiffusersReferences:
    """A diffusers UNet and a transformers text encoder with random weights (seed 0), saved with a small autoencoder
    as a diffusers SD1.5 folder at `folder`: the references of parity tests of adapters, and a folder that
    `StableDiffusion_1.from_pretrained` and `refiners generate` load. Needs diffusers and transformers (test extras).
    """

    def __init__(
        self,
        folder: Path,
        unet_config: Mapping[str, Any] = SMALL_UNET_DIFFUSERS_CONFIG,
        clip_config: Mapping[str, Any] = SMALL_CLIP_TRANSFORMERS_CONFIG,
    ) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
        from transformers import CLIPTextConfig, CLIPTextModel  # pyright: ignore[reportMissingTypeStubs]

        manual_seed(0)
        self.unet: Any = UNet2DConditionModel(**unet_config).eval()
        self.text_encoder: Any = CLIPTextModel(CLIPTextConfig(**clip_config)).eval()
        self.unet.save_pretrained(folder / "unet")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        AutoencoderKL(**SMALL_VAE_DIFFUSERS_CONFIG).save_pretrained(folder / "vae")  # pyright: ignore[reportUnknownMemberType]
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        self.folder = folder
        self.cross_attention_dim: int = unet_config["cross_attention_dim"]

    def targets(self) -> Iterator[tuple[str, str, torch.nn.Linear | torch.nn.Conv2d]]:
        """(component, module name, module) of every Linear and Conv2d a LoRA can patch."""
        for component, model in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                    yield component, name, module

    def component(self, name: str) -> Any:
        """The reference `unet` or `text_encoder`."""
        return self.unet if name == "unet" else self.text_encoder

    def pipeline(self) -> Any:
        """A fresh diffusers `StableDiffusionPipeline` on copies of the reference UNet and text encoder (LoRA loading
        patches them), the folder's autoencoder and a DDIM scheduler; no tokenizer (ours makes the token ids of both),
        no safety checker."""
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline  # pyright: ignore[reportPrivateImportUsage]

        components: dict[str, Any] = {
            "vae": AutoencoderKL.from_pretrained(self.folder / "vae"),  # pyright: ignore[reportUnknownMemberType]
            "text_encoder": copy.deepcopy(self.text_encoder),
            "tokenizer": None,
            "unet": copy.deepcopy(self.unet),
            "scheduler": DDIMScheduler(steps_offset=1, clip_sample=False),
            "safety_checker": None,
            "feature_extractor": None,
        }
        return StableDiffusionPipeline(**components, requires_safety_checker=False)


def open_clip_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The OpenCLIP text tower of a transformers `CLIPTextModelWithProjection` state dict of `num_layers` layers, as
    `conditioner.embedders.1.model.*` of SDXL's single files holds it: fused attention projections, `text_projection`
    multiplied from the right, and the contrastive `logit_scale`."""
    theirs = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    tensors = {
        "token_embedding.weight": theirs["embeddings.token_embedding.weight"],
        "positional_embedding": theirs["embeddings.position_embedding.weight"],
        "ln_final.weight": theirs["final_layer_norm.weight"],
        "ln_final.bias": theirs["final_layer_norm.bias"],
        "text_projection": theirs["text_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(4.6052),
    }
    for index in range(num_layers):
        layer, block = f"encoder.layers.{index}", f"transformer.resblocks.{index}"
        for param in ("weight", "bias"):
            for their_name, open_clip_name in _OPEN_CLIP_NAMES.items():
                tensors[f"{block}.{open_clip_name}.{param}"] = theirs[f"{layer}.{their_name}.{param}"]
            tensors[f"{block}.attn.in_proj_{param}"] = torch.cat(
                [theirs[f"{layer}.self_attn.{name}_proj.{param}"] for name in "qkv"]
            )
    return tensors


def small_unet_config(in_channels: int = 4) -> UNetConfig:
    """A scaled-down SD1.5 UNet: two levels of 32 channels, one layer each, cross-attention (4-wide heads, 32-wide
    text) at the first level only. Builds in milliseconds; for tests of adapters and pipelines."""
    return UNetConfig(
        in_channels=in_channels,
        block_out_channels=(32, 32),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
        cross_attention_levels=(True, False),
    )


def small_compile_unet() -> SD1UNet:
    """A scaled-down SD1.5 UNet for `torch.compile` tests: levels of 32 and 64 channels, one layer each, 4-wide
    heads, 24-wide text cross-attention at the first level only, 8 groups per norm; random weights drawn after seeding
    torch's global generator with 0, in eval mode."""
    torch.manual_seed(0)  # pyright: ignore[reportUnknownMemberType]
    return SD1UNet(
        UNetConfig(
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=4,
            cross_attention_dim=24,
            cross_attention_levels=(True, False),
            norm_num_groups=8,
        )
    ).eval()


def small_sd15_components(in_channels: int) -> dict[str, torch.nn.Module]:
    """`unet`, `lda` and `clip_text_encoder` of a scaled-down SD1.5 (32 channels, one layer each) with random weights
    drawn from seed `in_channels`, as keyword arguments of `StableDiffusion_1` (`in_channels` 4) or
    `StableDiffusion_1_Inpainting` (9)."""
    manual_seed(in_channels)
    return {
        "unet": SD1UNet(small_unet_config(in_channels)),
        "lda": SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        "clip_text_encoder": CLIPTextEncoderL(
            CLIPTextEncoderConfig(embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
        ),
    }


def randomize_with_seed(model: torch.nn.Module, seed: int) -> None:
    """Seed torch's global generator with `seed`, then draw every parameter of `model` from it, independently:
    weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1), so that no zero or constant initial value
    hides a missing or swapped key and activations keep their scale through the network."""
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            elif "norm" in name and name.endswith(".weight"):
                parameter.normal_(1.0, 0.1)
            else:
                parameter.normal_(0.0, 0.1)


def random_diffusers_unet(config: Mapping[str, Any], seed: int = 0) -> Any:
    """diffusers' `UNet2DConditionModel.from_config(config)`, built on the meta device (diffusers' own initialisation
    is not paid for), then every parameter drawn by `randomize_with_seed(unet, seed)`, in eval mode. Needs diffusers
    (test extra)."""
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    with torch.device("meta"):
        unet: torch.nn.Module = UNet2DConditionModel.from_config(dict(config))  # pyright: ignore[reportUnknownMemberType, reportAssignmentType]
    unet = unet.to_empty(device="cpu").eval()
    randomize_with_seed(unet, seed)
    return unet


@torch.no_grad()
def paired_outputs(
    sd: StableDiffusion_1, unet: Any, text_encoder: Any, cross_attention_dim: int, prompt: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ours, reference) for the UNet on seeded random latents and text (timestep 500), then (ours, reference) for the
    text encoder on `prompt`: `unet` is a diffusers `UNet2DConditionModel`, `text_encoder` a transformers
    `CLIPTextModel`, for parity tests of adapters patching both sides."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, cross_attention_dim, generator=generator)
    timestep = torch.tensor([500])
    sd.unet.set_timestep(timestep)
    sd.unet.set_clip_text_embedding(text)
    tokens = sd.clip_text_encoder.tokenizer(prompt)
    return (
        sd.unet(latents),
        unet(latents, timestep, encoder_hidden_states=text).sample,
        sd.clip_text_encoder(tokens),
        text_encoder(tokens).last_hidden_state,
    )


def adapter_value_cases(hub_source: str, image: str, windows_source: str) -> list[tuple[str, tuple[str, Path, float]]]:
    """Values of an adapter option `SOURCE:IMAGE[:SCALE]` of `refiners generate` and their (source, image, scale): a
    hub id and a relative image without a scale, a relative folder and an absolute image with one, and Windows paths
    whose drive letters hold a ':' (`windows_source` such as `C:\\adapters\\canny`)."""
    return [
        (f"{hub_source}:{image}", (hub_source, Path(image), 1.0)),
        ("./canny:/tmp/edges.png:0.8", ("./canny", Path("/tmp/edges.png"), 0.8)),
        (f"{windows_source}:D:\\edges.png:1.5", (windows_source, Path("D:\\edges.png"), 1.5)),
    ]


MALFORMED_ADAPTER_VALUES = [
    ("canny", "expected FOLDER:IMAGE"),
    (":edges.png", "expected FOLDER:IMAGE"),
    ("a:b:x", "'a:b:x': the scale must be a finite number, got 'x'"),
]
"""Values of a `FOLDER:IMAGE[:SCALE]` adapter option and what the error about each says."""


def write_bad_diffusers_sources(folder: Path) -> dict[str, Path]:
    """Under `folder`, what an adapter option must refuse as a diffusers model or image, by name: `empty` (a folder
    without config.json), `no_weights` (a config.json alone), `pointer` (a git-lfs pointer in place of the weights),
    `wide` (an 8x9000 image) and `missing` (no file)."""
    from PIL import Image

    paths = {name: folder / name for name in ("empty", "no_weights", "pointer")}
    for path in paths.values():
        path.mkdir()
    (paths["no_weights"] / "config.json").write_text("{}")
    (paths["pointer"] / "config.json").write_text("{}")
    (paths["pointer"] / "diffusion_pytorch_model.safetensors").write_text("version https://git-lfs.github.com/x")
    Image.new("L", (8, 9000)).save(folder / "wide.png")
    return {**paths, "wide": folder / "wide.png", "missing": folder / "missing.png"}


def cache_hub_config(cache: Path, repo_id: str) -> None:
    """Make the hub repository `repo_id` appear in the huggingface_hub cache folder `cache` with a `config.json`
    (`{}`) at its `main` revision, laid out as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    (repository / "snapshots" / commit).mkdir(parents=True)
    (repository / "snapshots" / commit / "config.json").write_text("{}")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)


@torch.no_grad()
def pipeline_latents(
    pipe: Any,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    size: int,
    steps: int,
    guidance: float,
    **arguments: Any,
) -> torch.Tensor:
    """The final latents of the diffusers SD1.5 pipeline `pipe`: `steps` steps of classifier-free guidance `guidance`
    on the (negative, positive) `embeddings`, `size`x`size`, seed 6 noise on the CPU, `output_type="latent"`;
    `arguments` add the adapter's inputs."""
    negative, positive = embeddings
    output = pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(6),
        output_type="latent",
        **arguments,
    )
    return output.images


def reference_guided_latents(
    pipeline_class: Any,
    modules: Mapping[str, Any],
    embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    images: list[Any],
    scale_argument: str,
    scales: list[float],
    size: int,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """`pipeline_latents` of the diffusers SD1.5 pipeline `pipeline_class` of an adapter (ControlNet, T2I-Adapter)
    built with `modules` (its UNet and adapter models), DDIM (`diffusers_reference_scheduler("ddim")`), no text
    encoder and an unused autoencoder of 4 levels (so that the latents are 1/8 of the image). The condition `images`
    and their `scales` (the call argument `scale_argument`) are given as a list for several adapters, alone for one,
    as diffusers takes them. Needs diffusers (test extra)."""
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]

    pipe: Any = pipeline_class(
        vae=AutoencoderKL(
            block_out_channels=(32,) * 4,  # pyright: ignore[reportArgumentType]
            down_block_types=("DownEncoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
            up_block_types=("UpDecoderBlock2D",) * 4,  # pyright: ignore[reportArgumentType]
        ),
        text_encoder=None,
        tokenizer=None,
        scheduler=diffusers_reference_scheduler("ddim"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    several = len(images) > 1
    return pipeline_latents(
        pipe,
        embeddings,
        size=size,
        steps=steps,
        guidance=guidance,
        image=images if several else images[0],
        **{scale_argument: scales if several else scales[0]},
    )


@torch.no_grad()
def our_guided_latents(
    unet: SD1UNet,
    adapt: Callable[[SD1UNet], object],
    embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    size: int,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """What `reference_guided_latents` computes, on our side: `StableDiffusion_1` with `unet` (which `adapt` adapts once
    the model is built) and the DDIM solver, from `init_latents(seed=6)`. Its autoencoder and text encoder, unused, are
    on the meta device."""
    sd = StableDiffusion_1(
        unet=unet,
        lda=SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32,) * 4), device="meta"),
        clip_text_encoder=CLIPTextEncoderL(device="meta"),
        show_progress=False,
    )
    adapt(sd.unet)
    sd.solver = DDIM(num_inference_steps=steps)
    embedding = torch.cat(embeddings)
    x = sd.init_latents(size=(size, size), seed=6)
    for step in sd.steps:
        x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=guidance)
    return x
