# pyright: reportPrivateImportUsage=false
"""`StableDiffusion_XL_Inpainting` and `StableDiffusion_XL_Refiner` against diffusers'
`StableDiffusionXLInpaintPipeline` and the base + refiner run of `StableDiffusionXLPipeline(denoising_end=f)` then
`StableDiffusionXLImg2ImgPipeline(denoising_start=f)`, and the errors for folders of the wrong kind.

Small SDXL-like components with random weights (`refiners_sdxl.testing`) are saved by diffusers' pipelines'
`save_pretrained` and loaded through our `from_pretrained`. Both sides start from the same noise and get the same text
embeddings (ours, passed to diffusers as `prompt_embeds`); final latents must agree within 1e-3 of max |reference|.
The autoencoder's log-variance is pinned to its floor (std 3e-7) so that diffusers' sampled latents of the masked
image are its mean, which is what ours (and diffusers' image-to-image with `sample_mode="argmax"`) use.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from refiners_core.testing import CAN_READ_MAPPINGS, assert_relative_close, is_mapped, parameters_viewing
from refiners_sd15 import DPMSolver, Euler, Solver
from refiners_sdxl import (
    StableDiffusion_XL,
    StableDiffusion_XL_Inpainting,
    StableDiffusion_XL_Refiner,
    refiner_first_step,
)
from refiners_sdxl.testing import (
    SDXL_SCHEDULER,
    SDXLReferences,
    guided_pipeline_arguments,
    guided_steps,
    prompt_arguments,
    sdxl_references,
)

TOLERANCE = 1e-3
SIZE = 64  # pixels: 8x8 latents
SOLVERS: dict[str, tuple[type[Solver], Any]] = {
    "dpm": (DPMSolver, DPMSolverMultistepScheduler),
    "euler": (Euler, EulerDiscreteScheduler),
}


@dataclass
class Folders:
    base: Path
    inpainting: Path
    refiner: Path
    references: SDXLReferences


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    references = sdxl_references()
    quant_conv = references.vae.quant_conv
    assert quant_conv is not None and quant_conv.bias is not None
    with torch.no_grad():
        latent_channels = references.vae.config["latent_channels"]
        quant_conv.weight[latent_channels:] = 0.0  # log-variance -30: diffusers' sampled latents are the mean
        quant_conv.bias[latent_channels:] = -30.0
    return Folders(*references.save_folders(tmp_path_factory.mktemp("sdxl_pipelines")), references)


def images() -> tuple[Image.Image, Image.Image]:
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))  # the area to repaint
    return Image.fromarray(pixels.numpy()), mask


# Inpainting


@torch.no_grad()
def test_inpainting_matches_stable_diffusion_xl_inpaint_pipeline(folders: Folders) -> None:
    """3 Euler steps with guidance at strength 1: the solver scales the latents, not the mask and masked image
    latents concatenated to them."""
    sdxl = StableDiffusion_XL_Inpainting.from_pretrained(folders.inpainting)
    sdxl.show_progress = False
    assert sdxl.unet.config.in_channels == 9
    sdxl.solver = Euler(num_inference_steps=3, **sdxl.solver_defaults)
    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    image, mask = images()

    pipeline = StableDiffusionXLInpaintPipeline(
        **folders.references.components(unet=folders.references.inpainting_unet), add_watermarker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    output: Any = pipeline(
        **guided_pipeline_arguments(embedding, pooled, steps=3, guidance_scale=5.0, size=SIZE),
        image=image,
        mask_image=mask,
        latents=noise.clone(),
        strength=1.0,
        generator=torch.Generator().manual_seed(8),
    )
    expected: torch.Tensor = output.images

    mask_latents, _ = sdxl.set_inpainting_conditions(image, mask)
    x = sdxl.init_latents(size=(SIZE, SIZE), noise=noise)
    time_ids = sdxl.time_ids(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    for step in sdxl.steps:
        x = sdxl(x, step=step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)

    assert mask_latents.shape == (1, 1, 8, 8) and 0 < mask_latents.mean() < 1
    assert not torch.allclose(expected, noise * sdxl.solver.init_noise_sigma, atol=0.1)
    assert_relative_close(x, expected, TOLERANCE, what="inpainting")


def test_inpainting_refuses_to_denoise_before_its_conditions_are_set(folders: Folders) -> None:
    sdxl = StableDiffusion_XL_Inpainting.from_pretrained(folders.inpainting)
    embedding, pooled = sdxl.compute_clip_text_embedding("a cat")
    x = sdxl.init_latents(size=(SIZE, SIZE), seed=0)
    with pytest.raises(ValueError, match=r"call set_inpainting_conditions\(target_image, mask\) before denoising"):
        sdxl(x, step=0, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=sdxl.default_time_ids)


def test_an_inpainting_folder_is_refused_by_the_base_model_naming_model_index(folders: Folders) -> None:
    with pytest.raises(ValueError, match=r"model_index\.json: _class_name is 'StableDiffusionXLInpaintPipeline'"):
        StableDiffusion_XL.from_pretrained(folders.inpainting)


def test_a_base_folder_is_refused_by_the_inpainting_model_naming_in_channels(folders: Folders) -> None:
    with pytest.raises(ValueError, match=r"StableDiffusion_XL_Inpainting needs a UNet with 9 input .* takes 4"):
        StableDiffusion_XL_Inpainting.from_pretrained(folders.base)


# Base + refiner


@pytest.mark.parametrize("name", SOLVERS)
@torch.no_grad()
def test_base_then_refiner_matches_denoising_end_then_denoising_start(folders: Folders, name: str) -> None:
    """4 guided steps, the base denoising to 0.5 (the first two timesteps with SDXL's leading spacing: 751 and 501
    for Euler, 801 and 601 for DPM-Solver), the refiner the rest from the base's latents, against diffusers' base
    pipeline with `denoising_end=0.5` and its image-to-image pipeline with `denoising_start=0.5` on the refiner's
    components."""
    solver_class, scheduler_class = SOLVERS[name]
    base = StableDiffusion_XL.from_pretrained(folders.base)
    refiner = StableDiffusion_XL_Refiner.from_pretrained(folders.refiner)
    base.show_progress = refiner.show_progress = False
    assert refiner.unet.config.cross_attention_dim == refiner.clip_text_encoder.config.embedding_dim
    embedding, pooled = base.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    refiner_embedding, refiner_pooled = refiner.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))

    scheduler = scheduler_class.from_config(SDXL_SCHEDULER)
    base_pipeline = StableDiffusionXLPipeline(
        **folders.references.components(scheduler=scheduler), add_watermarker=False
    )
    base_pipeline.set_progress_bar_config(disable=True)
    output: Any = base_pipeline(
        **guided_pipeline_arguments(embedding, pooled, steps=4, guidance_scale=5.0, size=SIZE),
        latents=noise.clone(),
        denoising_end=0.5,
    )
    expected_handover: torch.Tensor = output.images
    refiner_pipeline: Any = StableDiffusionXLImg2ImgPipeline(
        **folders.references.components(
            unet=folders.references.refiner_unet,
            text_encoder=None,
            scheduler=scheduler_class.from_config(SDXL_SCHEDULER),
        ),
        requires_aesthetics_score=True,
        add_watermarker=False,
    )
    refiner_pipeline.set_progress_bar_config(disable=True)
    output = refiner_pipeline(
        image=expected_handover.clone(),
        **prompt_arguments(refiner_embedding, refiner_pooled),
        num_inference_steps=4,
        denoising_start=0.5,
        guidance_scale=5.0,
        original_size=(SIZE, SIZE),
        output_type="latent",
    )
    expected: torch.Tensor = output.images

    base.solver = solver_class(num_inference_steps=4, **base.solver_defaults)
    handover = refiner_first_step(base.solver, denoising_end=0.5)
    assert handover == 2
    x = base.init_latents(size=(SIZE, SIZE), noise=noise)
    time_ids = base.time_ids(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    for step in range(handover):
        x = base(x, step=step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)
    assert_relative_close(x, expected_handover, TOLERANCE, what=f"{name}: the base's latents at the handover")
    refiner.solver = solver_class(num_inference_steps=4, first_inference_step=handover, **refiner.solver_defaults)
    refiner_time_ids = refiner.time_ids(original_size=(SIZE, SIZE))
    assert refiner_time_ids.tolist() == [[SIZE, SIZE, 0, 0, 2.5], [SIZE, SIZE, 0, 0, 6.0]]
    x = guided_steps(refiner, x, refiner_embedding, refiner_pooled, refiner_time_ids)

    assert not torch.allclose(expected, expected_handover, atol=0.1)  # the refiner moved the latents
    assert_relative_close(x, expected, TOLERANCE, what=f"{name}: base + refiner")


def test_refiner_first_step_refuses_a_split_that_leaves_a_model_no_step() -> None:
    solver = Euler(num_inference_steps=4, timestep_spacing="leading", steps_offset=1)
    assert refiner_first_step(solver, 0.8) == 3  # timesteps 751, 501, 251 >= 200 > 1
    with pytest.raises(ValueError, match=r"denoising_end=0\.1 hands over at step 0 of 4"):
        refiner_first_step(solver, 0.1)
    with pytest.raises(ValueError, match="denoising_end must be strictly between 0 and 1, got 1.0"):
        refiner_first_step(solver, 1.0)


def test_a_base_folder_is_refused_as_a_refiner_naming_model_index(folders: Folders) -> None:
    with pytest.raises(ValueError, match=r"model_index\.json: .* with a text_encoder .*not a refiner"):
        StableDiffusion_XL_Refiner.from_pretrained(folders.base)


def test_a_refiner_folder_is_refused_as_a_base_pointing_to_the_refiner(folders: Folders) -> None:
    with pytest.raises(ValueError, match=r"model_index\.json: .* without text_encoder .*StableDiffusion_XL_Refiner"):
        StableDiffusion_XL.from_pretrained(folders.refiner)


def test_a_refiner_folder_without_text_encoder_2_is_refused_naming_it(folders: Folders, tmp_path: Path) -> None:
    folder = tmp_path / "refiner"
    shutil.copytree(folders.refiner, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2"):
        StableDiffusion_XL_Refiner.from_pretrained(folder)


def test_a_base_unet_in_a_refiner_folder_is_refused_naming_both_widths(folders: Folders, tmp_path: Path) -> None:
    folder = tmp_path / "refiner"
    shutil.copytree(folders.refiner, folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(folders.base / "unet", folder / "unet")
    with pytest.raises(ValueError, match=r"unet attends to 80-wide text .* text_encoder_2 gives 48"):
        StableDiffusion_XL_Refiner.from_pretrained(folder)


def test_refiner_save_pretrained_round_trip_keeps_every_weight_and_is_refused_by_the_base(
    folders: Folders, tmp_path: Path
) -> None:
    refiner = StableDiffusion_XL_Refiner.from_pretrained(folders.refiner)
    refiner.save_pretrained(tmp_path / "ours")
    loaded = StableDiffusion_XL_Refiner.from_pretrained(tmp_path / "ours")

    assert loaded.unet.config == refiner.unet.config and loaded.solver_defaults == refiner.solver_defaults
    assert loaded.clip_text_encoder.config == refiner.clip_text_encoder.config
    expected = refiner.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    with pytest.raises(ValueError, match=r"refiners_sdxl_refiner\.json: an SDXL refiner .*StableDiffusion_XL_Refiner"):
        StableDiffusion_XL.from_pretrained(tmp_path / "ours")


@pytest.mark.parametrize(
    "index, message",
    [
        (
            "refiners_sdxl.json",
            r"refiners_sdxl\.json: an SDXL base model .*not an SDXL refiner: load it with StableDiffusion_XL$",
        ),
        ("refiners_sd15.json", r"refiners_sd15\.json: a Stable Diffusion 1\.5 model .*load it with StableDiffusion_1$"),
    ],
)
def test_a_folder_saved_by_another_model_is_refused_by_the_refiner_naming_its_index(
    tmp_path: Path, index: str, message: str
) -> None:
    (tmp_path / index).write_text("{}")
    with pytest.raises(ValueError, match=message):
        StableDiffusion_XL_Refiner.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "text, negative_text, error, message",
    [
        ([], "", ValueError, "at least one prompt"),
        (["a", "b"], ["c"], ValueError, "got 2 prompts but 1 negative prompts"),
        (["a", 3], "", TypeError, "a prompt must be a string, got int 3"),
        ("a", None, TypeError, "a negative prompt must be a string, got NoneType"),
    ],
)
def test_base_and_refiner_refuse_prompts_that_are_not_strings_or_do_not_pair(
    folders: Folders, text: Any, negative_text: Any, error: type[Exception], message: str
) -> None:
    for model in (
        StableDiffusion_XL.from_pretrained(folders.base),
        StableDiffusion_XL_Refiner.from_pretrained(folders.refiner),
    ):
        with pytest.raises(error, match=message):
            model.compute_clip_text_embedding(text, negative_text=negative_text)


# Memory-mapped loading

MODEL_CLASSES: dict[str, type[StableDiffusion_XL] | type[StableDiffusion_XL_Refiner]] = {
    "base": StableDiffusion_XL,
    "inpainting": StableDiffusion_XL_Inpainting,
    "refiner": StableDiffusion_XL_Refiner,
}


def written(folders: Folders, name: str, layout: str, root: Path) -> Path:
    """The `name` model of `folders` as `layout`: its diffusers folder, a copy whose UNet is sharded, or the folder its
    `save_pretrained` writes (in `root`, fresh: no other test maps their files)."""
    if layout == "own":
        MODEL_CLASSES[name].from_pretrained(getattr(folders, name)).save_pretrained(root / "own")
        return root / "own"
    folder = root / "diffusers"
    shutil.copytree(getattr(folders, name), folder)
    if layout == "sharded":
        unet = {"base": folders.references.unet, "inpainting": folders.references.inpainting_unet}.get(
            name, folders.references.refiner_unet
        )
        for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
            weights.unlink()
        unet.save_pretrained(folder / "unet", max_shard_size="4MB")
        assert len(list((folder / "unet").glob("*.safetensors"))) > 1, "the UNet was not sharded"
    return folder


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
@pytest.mark.parametrize("layout", ["diffusers", "sharded", "own"])
@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_from_pretrained_with_mmap_loads_the_default_model_as_views_of_its_files(
    folders: Folders, name: str, layout: str, tmp_path: Path
) -> None:
    """Bitwise the default load's weights, each parameter a view of the files; outputs within 1e-5 of the default's
    (float32 rounding: the copy aligns each tensor to 64 bytes, the files may align them to 8 only, and BLAS kernels
    sum unaligned weights in another order)."""
    source = written(folders, name, layout, tmp_path)
    files = list(source.rglob("*.safetensors"))
    copied = MODEL_CLASSES[name].from_pretrained(source)
    mapped = MODEL_CLASSES[name].from_pretrained(source, mmap=True)

    views, copies = parameters_viewing(mapped, files)
    assert views and not copies, f"{len(copies)} parameters copied out of the mapped files, e.g. {copies[:1]}"
    assert not parameters_viewing(copied, files)[0]
    assert all(parameter.dtype == torch.float32 for parameter in mapped.parameters())
    expected = copied.state_dict()
    assert list(mapped.state_dict()) == list(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in mapped.state_dict().items())
    assert mapped.solver_defaults == copied.solver_defaults
    outputs: list[torch.Tensor] = []
    for model in (copied, mapped):
        if isinstance(model, StableDiffusion_XL_Inpainting):
            model.set_inpainting_conditions(*images())
        embedding, pooled = model.compute_clip_text_embedding("a cat")
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            noise = model.compute_noise(latents, torch.tensor([500]), embedding, pooled, model.default_time_ids, 5.0)
        outputs.append(noise)
    assert_relative_close(outputs[1], outputs[0], 1e-5, what="mapped model's guided noise")


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
def test_from_pretrained_with_mmap_and_another_dtype_converts_and_keeps_no_mapping(
    folders: Folders, tmp_path: Path
) -> None:
    source = written(folders, "base", "diffusers", tmp_path)
    sdxl = StableDiffusion_XL.from_pretrained(source, dtype=torch.float64, mmap=True)

    assert all(tensor.dtype == torch.float64 for tensor in [*sdxl.parameters(), *sdxl.buffers()])
    gc.collect()  # the mapped tensors the conversion read from are garbage once loaded
    assert not [path for path in source.rglob("*.safetensors") if is_mapped(path)]
    expected = StableDiffusion_XL.from_pretrained(source, dtype=torch.float64).state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in sdxl.state_dict().items())
