# pyright: reportPrivateImportUsage=false
"""The denoising loops of `StableDiffusion_1` and `StableDiffusion_1_Inpainting` against diffusers' pipelines.

The reference is diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` run with `output_type="latent"`, the same text embeddings (`prompt_embeds`,
`negative_prompt_embeds`), the same starting noise (the same seeded CPU generator) and the scheduler our solver
reproduces. The UNet has the full published SD1.5 architecture (4 and 9 input channels) with random weights,
shared by both sides; the autoencoder is a small one (4 levels, so latents are 1/8 of the image) and latents are
8x8. Final latents must agree within 1e-3 of max |reference| after 3 steps with classifier-free guidance: for each
solver in text-to-image, with DPM-Solver for image-to-image and Euler for inpainting (a full UNet forward costs
seconds on a CPU; every solver's image-to-image start is checked without a UNet in test_sd15_solvers.py).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.testing import assert_relative_close
from refiners_sd15 import (
    DDIM,
    CLIPTextEncoderL,
    DPMSolver,
    Euler,
    SD1Autoencoder,
    SD1UNet,
    Solver,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners_sd15.testing import SD15_UNET_CONFIG, diffusers_reference_scheduler
from refiners_sd15.unet import SD15_UNET, diffusers_unet_mapping

TOLERANCE = 1e-3
SIZE = 64  # pixels: 8x8 latents
SMALL_VAE: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
SOLVERS: dict[str, tuple[type[Solver], Any]] = {
    "ddim": (DDIM, lambda: diffusers_reference_scheduler("ddim")),
    "dpm": (DPMSolver, lambda: diffusers_reference_scheduler("dpm")),
    "euler": (Euler, lambda: diffusers_reference_scheduler("euler")),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn independently (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ N(1, 0.1))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                std = parameter[0].numel() ** -0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif "norm" in name and name.endswith(".weight"):
                parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def diffusers_unet(in_channels: int) -> UNet2DConditionModel:
    config = {**SD15_UNET_CONFIG, "in_channels": in_channels}
    with torch.device("meta"):
        return cast(UNet2DConditionModel, UNet2DConditionModel.from_config(config))  # pyright: ignore[reportUnknownMemberType]


def our_unet(reference: UNet2DConditionModel, in_channels: int) -> SD1UNet:
    """Our UNet holding the very tensors of `reference` (no copy), through our diffusers key mapping."""
    unet = SD1UNet(replace(SD15_UNET, in_channels=in_channels), device="meta")
    tensors = reference.state_dict()
    load_state_dict_checked(unet, tensors, source="reference", mapping=diffusers_unet_mapping(), assign_to_device="cpu")
    for module in unet.modules():  # buffers outside the state dict (empty device anchors) are still on meta
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, name, torch.empty_like(buffer, device="cpu"))
    return unet.eval()


@dataclass
class Models:
    unet: UNet2DConditionModel
    inpainting_unet: UNet2DConditionModel
    vae: AutoencoderKL
    sd: StableDiffusion_1
    inpainting: StableDiffusion_1_Inpainting


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    """The full SD1.5 UNet (random weights) and its 9-channel inpainting variant, which shares every tensor but the
    input convolution's; both sides share the weights, so the module holds about 3.5 GB."""
    unet = diffusers_unet(4).to_empty(device="cpu").eval()
    randomize(unet, seed=0)
    inpainting_unet = diffusers_unet(9)
    weights = unet.state_dict()
    generator = torch.Generator().manual_seed(1)
    weights["conv_in.weight"] = torch.randn(320, 9, 3, 3, generator=generator) / 27**0.5
    inpainting_unet.load_state_dict(weights, assign=True)
    inpainting_unet.eval()

    torch.manual_seed(2)
    vae = cast(AutoencoderKL, AutoencoderKL(**SMALL_VAE)).eval()
    randomize(vae, seed=3)
    quant_conv = cast(torch.nn.Conv2d, vae.quant_conv)
    with torch.no_grad():  # a posterior of std exp(-15): diffusers' sampled latents are our posterior mean
        quant_conv.weight[4:] = 0
        cast(torch.Tensor, quant_conv.bias)[4:] = -30
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)  # pyright: ignore[reportUnknownMemberType]
    lda = SD1Autoencoder.from_pretrained(folder, subfolder="").eval()
    clip = CLIPTextEncoderL(device="meta")  # unused: the tests give text embeddings
    sd = StableDiffusion_1(unet=our_unet(unet, 4), lda=lda, clip_text_encoder=clip, show_progress=False)
    inpainting = StableDiffusion_1_Inpainting(
        unet=our_unet(inpainting_unet, 9), lda=lda, clip_text_encoder=clip, show_progress=False
    )
    yield Models(unet, inpainting_unet, vae, sd, inpainting)
    gc.collect()


@pytest.fixture(scope="module")
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.randn(1, 77, 768, generator=generator), torch.randn(1, 77, 768, generator=generator)


def images() -> tuple[Image.Image, Image.Image]:
    generator = torch.Generator().manual_seed(5)
    pixels = (torch.rand(SIZE, SIZE, 3, generator=generator) * 255).to(torch.uint8)
    image = Image.frombytes("RGB", (SIZE, SIZE), bytes(pixels.flatten().tolist()))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    return image, mask


def pipeline(kind: type[Any], models: Models, scheduler: Any) -> Any:
    unet = models.inpainting_unet if kind is StableDiffusionInpaintPipeline else models.unet
    no_text_encoder: dict[str, Any] = {"text_encoder": None, "tokenizer": None}  # prompt_embeds are given
    no_safety_checker: dict[str, Any] = {"safety_checker": None, "feature_extractor": None}
    pipe = kind(
        vae=models.vae,
        unet=unet,
        scheduler=scheduler,
        **no_text_encoder,
        **no_safety_checker,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(
    pipeline_class: Any,
    models: Models,
    scheduler: Any,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    guidance: float,
    seed: int,
    **inputs: Any,
) -> torch.Tensor:
    """The final latents of the diffusers `pipeline_class` run on our (negative, positive) `embeddings`: `steps`
    steps with classifier-free guidance of `guidance`, noise from `seed`; `inputs` adds the image, mask, size..."""
    negative, positive = embeddings
    return pipeline(pipeline_class, models, scheduler)(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **inputs,
    ).images


def denoise(sd: StableDiffusion_1, x: torch.Tensor, embedding: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=scale)
    return x


@pytest.mark.parametrize("solver", SOLVERS)
def test_text_to_image_loop_matches_diffusers_pipeline(
    models: Models, embeddings: tuple[torch.Tensor, torch.Tensor], solver: str
) -> None:
    ours_class, scheduler = SOLVERS[solver]
    negative, positive = embeddings
    reference = reference_latents(
        StableDiffusionPipeline, models, scheduler(), embeddings, steps=3, guidance=7.5, seed=6, height=SIZE, width=SIZE
    )

    sd = models.sd
    sd.solver = ours_class(num_inference_steps=3)
    x = sd.init_latents(size=(SIZE, SIZE), seed=6)
    ours = denoise(sd, x, torch.cat([negative, positive]), 7.5)

    assert_relative_close(ours, reference, TOLERANCE)


def test_image_to_image_loop_matches_diffusers_pipeline(
    models: Models, embeddings: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """4 DPM steps at strength 0.75: diffusers runs the last 3, from the init latents noised to the second timestep
    (a multistep solver that starts in the middle of its schedule; `add_noise` and the first step of every solver
    are checked against diffusers in test_sd15_solvers.py)."""
    ours_class, scheduler = SOLVERS["dpm"]
    negative, positive = embeddings
    image, _ = images()
    sd = models.sd
    init_latents = sd.lda.image_to_latents(image)
    reference = reference_latents(
        StableDiffusionImg2ImgPipeline,
        models,
        scheduler(),
        embeddings,
        steps=4,
        guidance=5.0,
        seed=7,
        image=init_latents,  # diffusers takes 4-channel images as latents
        strength=0.75,
    )

    sd.solver = ours_class(num_inference_steps=4, first_inference_step=1)
    x = sd.init_latents(size=(SIZE, SIZE), init_image=image, seed=7)
    ours = denoise(sd, x, torch.cat([negative, positive]), 5.0)

    assert_relative_close(ours, reference, TOLERANCE)


def test_inpainting_loop_matches_diffusers_pipeline(
    models: Models, embeddings: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """3 Euler steps: the solver scales the latents, not the mask and masked image latents concatenated to them."""
    ours_class, scheduler = SOLVERS["euler"]
    negative, positive = embeddings
    image, mask = images()
    reference = reference_latents(
        StableDiffusionInpaintPipeline,
        models,
        scheduler(),
        embeddings,
        steps=3,
        guidance=7.5,
        seed=8,
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
    )

    sd = models.inpainting
    sd.solver = ours_class(num_inference_steps=3)
    mask_latents, _ = sd.set_inpainting_conditions(image, mask)
    x = sd.init_latents(size=(SIZE, SIZE), seed=8)
    ours = denoise(sd, x, torch.cat([negative, positive]), 7.5)

    assert mask_latents.shape == (1, 1, 8, 8) and 0 < mask_latents.mean() < 1
    assert_relative_close(ours, reference, TOLERANCE)
