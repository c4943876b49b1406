# pyright: reportPrivateImportUsage=false
"""`StableDiffusion_XL`: loading a diffusers `StableDiffusionXLPipeline` folder, the errors for folders that are not
an SDXL base, its API, and its denoising loop against diffusers' `StableDiffusionXLPipeline` (text-to-image) and
`StableDiffusionXLImg2ImgPipeline` (image-to-image).

The folder is written by diffusers' `save_pretrained` from small components with random weights (an SDXL-like UNet
with the `text_time` added embedding, a CLIP-L-like `CLIPTextModel`, a CLIP-G-like `CLIPTextModelWithProjection`, a
4-level autoencoder, SDXL's published Euler scheduler config), and loaded through `StableDiffusion_XL.from_pretrained`.
The denoising loop runs 3 steps of classifier-free guidance on 8x8 latents; both sides start from the same noise and
get the same text embeddings (ours, passed to diffusers as `prompt_embeds`); final latents must agree within 1e-3 of
max |reference| for every solver.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from refiners_sd15 import DDIM, DPMSolver, Euler, Solver, StableDiffusion_1
from refiners_sd15.solvers import DDPM, LCM, DPMSolverSDE, EulerAncestral, Heun, StochasticSolver
from refiners_sd15.unet.blocks import CrossAttention
from refiners_sdxl import StableDiffusion_XL, diffusers_sdxl_unet_mapping
from refiners_sdxl.testing import (
    G_DIM,
    L_DIM,
    POOLED_DIM,
    TIME_ID_DIM,
    guided_latents,
    guided_pipeline_arguments,
    prompt_arguments,
    small_sdxl_pipeline,
)

TOLERANCE = 1e-3
SIZE = 64  # pixels: 8x8 latents
SOLVERS: dict[str, tuple[Callable[..., Solver], Any]] = {
    "ddim": (DDIM, lambda config: DDIMScheduler.from_config(config, clip_sample=False)),
    "dpm": (DPMSolver, lambda config: DPMSolverMultistepScheduler.from_config(config)),
    "euler": (Euler, lambda config: EulerDiscreteScheduler.from_config(config)),
    "ddpm": (DDPM, lambda config: DDPMScheduler.from_config(config, clip_sample=False)),
    "lcm": (LCM, lambda config: LCMScheduler.from_config(config)),
    "euler-a": (EulerAncestral, lambda config: EulerAncestralDiscreteScheduler.from_config(config)),
    "heun": (Heun, lambda config: HeunDiscreteScheduler.from_config(config)),
    "dpm++2m-sde-karras": (
        functools.partial(DPMSolverSDE, sigma_schedule="karras"),
        lambda config: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        ),
    ),
}
"""Our solvers and the diffusers schedulers they reproduce from SDXL's scheduler config; the stochastic ones get
generators seeded alike on both sides."""


@dataclass
class Reference:
    pipeline: StableDiffusionXLPipeline
    folder: Path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    pipeline = small_sdxl_pipeline()
    folder = tmp_path_factory.mktemp("sdxl")
    pipeline.save_pretrained(folder)
    return Reference(pipeline, folder)


@pytest.fixture(scope="module")
def sdxl(reference: Reference) -> StableDiffusion_XL:
    model = StableDiffusion_XL.from_pretrained(reference.folder)
    model.show_progress = False
    return model


def variant(reference: Reference, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(reference.folder, folder)
    return folder


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# Loading


def test_from_pretrained_reads_every_config_and_the_scheduler(sdxl: StableDiffusion_XL) -> None:
    assert sdxl.unet.config.cross_attention_dim == L_DIM + G_DIM
    assert sdxl.unet.config.transformer_layers_per_block == (1, 2)
    assert sdxl.lda.config.scaling_factor == 0.13025
    assert sdxl.clip_text_encoder.text_encoder_l.config.embedding_dim == L_DIM
    assert sdxl.clip_text_encoder.text_encoder_g.config.projection_dim == POOLED_DIM
    assert sdxl.clip_text_encoder.text_encoder_g.tokenizer.pad_token_id == 0
    assert sdxl.solver_defaults["timestep_spacing"] == "leading" and sdxl.solver_defaults["steps_offset"] == 1
    assert isinstance(sdxl.solver, DPMSolver) and sdxl.solver.timestep_spacing == "leading"


def test_a_v_prediction_scheduler_config_is_read_by_every_solver_set_on_the_model(
    reference: Reference, tmp_path: Path
) -> None:
    folder = variant(reference, tmp_path, "v_prediction")
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction", beta_schedule="linear")

    model = StableDiffusion_XL.from_pretrained(folder)
    model.solver = Heun(num_inference_steps=3)

    assert (model.solver.prediction_type, model.solver.noise_schedule) == ("v_prediction", "linear")
    assert (DPMSolver(3).prediction_type, DPMSolver(3).noise_schedule) == ("epsilon", "scaled_linear")  # off a model
    edit_json(folder / "scheduler" / "scheduler_config.json", beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="beta_schedule is 'squaredcos_cap_v2', our solvers use 'scaled_linear' or"):
        StableDiffusion_XL.from_pretrained(folder)


@pytest.mark.parametrize("solver_class", [DDIM, DPMSolver, Euler])
def test_a_solver_set_on_sdxl_takes_the_model_spacing_unless_given_one(
    sdxl: StableDiffusion_XL, solver_class: type[Solver]
) -> None:
    sdxl.solver = solver_class(num_inference_steps=30)
    with_defaults = sdxl.solver
    sdxl.solver = solver_class(num_inference_steps=30, timestep_spacing="linspace")
    explicit = sdxl.solver
    sdxl.solver = solver_class(num_inference_steps=30, steps_offset=0)
    other_offset = sdxl.solver

    assert isinstance(with_defaults, solver_class)
    assert (with_defaults.timestep_spacing, with_defaults.steps_offset) == ("leading", 1)
    assert torch.equal(with_defaults.timesteps, solver_class(30, **sdxl.solver_defaults).timesteps)
    assert (explicit.timestep_spacing, explicit.steps_offset) == ("linspace", 1)
    assert not torch.equal(explicit.timesteps, with_defaults.timesteps)
    assert (other_offset.timestep_spacing, other_offset.steps_offset) == ("leading", 0)
    assert solver_class(num_inference_steps=30).timestep_spacing == solver_class.default_spacing  # off a model


def test_from_pretrained_puts_every_parameter_on_the_requested_dtype(reference: Reference) -> None:
    model = StableDiffusion_XL.from_pretrained(reference.folder, device="cpu", dtype=torch.float64)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(tensor.dtype == torch.float64 and tensor.device.type == "cpu" for tensor in tensors)
    expected = reference.pipeline.unet.state_dict()["conv_in.weight"].double()
    ours = diffusers_sdxl_unet_mapping(model.unet.config)["conv_in.weight"]
    assert torch.equal(model.unet.state_dict()[ours], expected)


@pytest.mark.parametrize("options", [{}, {"mmap": True}, {"dtype": torch.float64}], ids=["copy", "mmap", "float64"])
def test_from_pretrained_under_inference_mode_gives_normal_tensors_and_the_text_keys_are_reused(
    reference: Reference, options: dict[str, Any]
) -> None:
    """Normal tensors (with version counters, trainable) even when loaded under `torch.inference_mode()`, so that
    the cross-attentions reuse the text's keys and values from one step to the next there too."""
    with torch.inference_mode():
        model = StableDiffusion_XL.from_pretrained(reference.folder, **options)
        assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
        dtype = options.get("dtype", torch.float32)
        embedding, pooled = model.compute_clip_text_embedding("a cat", negative_text="")
        unet = model.unet
        unet.set_timestep(torch.tensor([500]))
        unet.set_clip_text_embedding(embedding)
        unet.set_pooled_text_embedding(pooled)
        unet.set_time_ids(model.default_time_ids.to(dtype))
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        first = unet(x)
        attentions = list(unet.layers(CrossAttention))
        assert attentions and all(attention.text_keys_values is not None for attention in attentions)
        cached = [attention.text_keys_values for attention in attentions]
        again = unet(x)
        assert all(a.text_keys_values is c for a, c in zip(attentions, cached, strict=True))
    assert torch.equal(first, again)


def test_an_sd15_folder_is_refused_naming_model_index(reference: Reference, tmp_path: Path) -> None:
    folder = variant(reference, tmp_path, "sd15")
    edit_json(folder / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(
        ValueError, match=r"model_index\.json: _class_name is 'StableDiffusionPipeline'.*StableDiffusion_1"
    ):
        StableDiffusion_XL.from_pretrained(folder)


def test_an_sd15_unet_is_refused_naming_the_unet(reference: Reference, tmp_path: Path) -> None:
    folder = variant(reference, tmp_path, "sd15_unet")
    (folder / "model_index.json").unlink()
    edit_json(
        folder / "unet" / "config.json",
        addition_embed_type=None,
        addition_time_embed_dim=None,
        projection_class_embeddings_input_dim=None,
    )
    with pytest.raises(ValueError, match=r"unet: no 'text_time' added embedding.*StableDiffusion_1"):
        StableDiffusion_XL.from_pretrained(folder)


def test_an_sdxl_folder_is_refused_by_stable_diffusion_1_naming_model_index(reference: Reference) -> None:
    with pytest.raises(
        ValueError, match=r"model_index\.json: _class_name is 'StableDiffusionXLPipeline'.*StableDiffusion_XL"
    ):
        StableDiffusion_1.from_pretrained(reference.folder)


def test_a_folder_without_text_encoder_2_is_refused_naming_it(reference: Reference, tmp_path: Path) -> None:
    folder = variant(reference, tmp_path, "no_text_encoder_2")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"no text_encoder_2 in .*text_encoder_2"):
        StableDiffusion_XL.from_pretrained(folder)


def test_a_refiner_folder_is_refused_as_a_base(reference: Reference, tmp_path: Path) -> None:
    folder = variant(reference, tmp_path, "refiner")
    edit_json(folder / "model_index.json", text_encoder=[None, None])
    with pytest.raises(ValueError, match=r"model_index\.json: .* without text_encoder .*refiner"):
        StableDiffusion_XL.from_pretrained(folder)


def test_text_encoders_that_do_not_fit_the_unet_are_named_with_their_widths(
    reference: Reference, tmp_path: Path
) -> None:
    folder = variant(reference, tmp_path, "mismatch")
    edit_json(folder / "unet" / "config.json", cross_attention_dim=96)
    with pytest.raises(ValueError, match=r"unet attends to 96-wide .* text_encoder \(32\) and text_encoder_2 \(48\)"):
        StableDiffusion_XL.from_pretrained(folder)


def test_a_refiner_unet_is_refused_naming_the_pooled_width_and_time_ids(reference: Reference, tmp_path: Path) -> None:
    folder = variant(reference, tmp_path, "refiner_unet")
    edit_json(folder / "unet" / "config.json", projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_ID_DIM)
    with pytest.raises(ValueError, match=r"added embedding takes 80 features .* \(40\) and 6 time ids .*refiner"):
        StableDiffusion_XL.from_pretrained(folder)


# API


def test_clip_text_embedding_is_negative_first_and_2048_wide_for_the_published_sizes(sdxl: StableDiffusion_XL) -> None:
    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    assert embedding.shape == (2, 77, L_DIM + G_DIM) and pooled.shape == (2, POOLED_DIM)
    negative, negative_pooled = sdxl.compute_clip_text_embedding("blurry", negative_text="blurry")
    assert torch.equal(embedding[0], negative[0]) and torch.equal(pooled[0], negative_pooled[0])
    assert not torch.equal(embedding[0], embedding[1])
    with pytest.raises(ValueError, match="2 prompts but 1 negative"):
        sdxl.compute_clip_text_embedding(["a", "b"], negative_text=["c"])


def test_time_ids_are_in_diffusers_order_negative_first(sdxl: StableDiffusion_XL) -> None:
    time_ids = sdxl.time_ids(original_size=(768, 512), crop_top_left=(8, 16), target_size=(1024, 896))
    assert time_ids.tolist() == [[768, 512, 8, 16, 1024, 896]] * 2
    negative = sdxl.time_ids(negative_original_size=(512, 512))
    assert negative.tolist() == [[512, 512, 0, 0, 1024, 1024], [1024, 1024, 0, 0, 1024, 1024]]
    assert sdxl.default_time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2


def test_conditions_without_a_negative_row_are_refused(sdxl: StableDiffusion_XL) -> None:
    embedding, pooled = sdxl.compute_clip_text_embedding("a cat")
    x = sdxl.init_latents(size=(SIZE, SIZE), seed=0)
    with pytest.raises(ValueError, match="time_ids must hold a negative and a positive row per latent: 2 for 1"):
        sdxl(x, step=0, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=sdxl.time_ids()[:1])


# The denoising loop against diffusers


@pytest.mark.parametrize("name", SOLVERS)
@torch.no_grad()
def test_three_guided_steps_match_stable_diffusion_xl_pipeline(
    reference: Reference, sdxl: StableDiffusion_XL, name: str
) -> None:
    solver_class, scheduler = SOLVERS[name]
    sdxl.solver = solver_class(num_inference_steps=3)  # the model's spacing, as the API example
    if isinstance(sdxl.solver, StochasticSolver):
        sdxl.solver = sdxl.solver.with_settings(generator=torch.Generator().manual_seed(9))
    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))

    components = reference.pipeline.components  # a new pipeline: the shared one keeps SDXL's scheduler config
    pipeline = StableDiffusionXLPipeline(**{**components, "scheduler": scheduler(components["scheduler"].config)})
    pipeline.set_progress_bar_config(disable=True)
    output: Any = pipeline(
        **guided_pipeline_arguments(embedding, pooled, steps=3, guidance_scale=5.0, size=SIZE),
        latents=noise.clone(),
        generator=torch.Generator().manual_seed(9),  # for the noise of stochastic schedulers' steps
    )
    expected: torch.Tensor = output.images

    x = guided_latents(sdxl, noise, embedding, pooled, size=SIZE, condition_scale=5.0)

    assert not torch.allclose(expected, noise, atol=0.1)  # the loop moved the latents
    error, scale = (x - expected).abs().max().item(), expected.abs().max().item()
    assert error <= TOLERANCE * scale, f"{name}: max |ours - diffusers| = {error:.3g} > {TOLERANCE} * {scale:.3g}"


@torch.no_grad()
def test_image_to_image_matches_stable_diffusion_xl_img2img_pipeline(
    reference: Reference, sdxl: StableDiffusion_XL
) -> None:
    """4 DPM steps at strength 0.75: diffusers runs the last 3 from the image's latents noised to the second
    timestep; ours is a solver with `first_inference_step=1` and `init_latents(..., init_image=image)`."""
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    embedding, pooled = sdxl.compute_clip_text_embedding("a cute cat", negative_text="blurry")
    init_latents = sdxl.lda.image_to_latents(image)

    pipeline: Any = StableDiffusionXLImg2ImgPipeline(**reference.pipeline.components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(reference.pipeline.scheduler.config)
    output: Any = pipeline(
        image=init_latents,  # diffusers takes 4-channel images as latents
        **prompt_arguments(embedding, pooled),
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    )
    expected: torch.Tensor = output.images

    sdxl.solver = DPMSolver(num_inference_steps=4, first_inference_step=1)
    x = sdxl.init_latents(size=(SIZE, SIZE), init_image=image, seed=7)
    time_ids = sdxl.time_ids(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    for step in sdxl.steps:
        x = sdxl(x, step=step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)

    assert not torch.allclose(expected, init_latents, atol=0.1)
    error, scale = (x - expected).abs().max().item(), expected.abs().max().item()
    assert error <= TOLERANCE * scale, f"max |ours - diffusers| = {error:.3g} > {TOLERANCE} * {scale:.3g}"


def test_save_pretrained_round_trip_keeps_every_weight_config_and_solver_default(
    sdxl: StableDiffusion_XL, tmp_path: Path
) -> None:
    sdxl.save_pretrained(tmp_path / "ours")
    loaded = StableDiffusion_XL.from_pretrained(tmp_path / "ours")

    assert loaded.unet.config == sdxl.unet.config and loaded.lda.config == sdxl.lda.config
    assert loaded.clip_text_encoder.text_encoder_l.config == sdxl.clip_text_encoder.text_encoder_l.config
    assert loaded.clip_text_encoder.text_encoder_g.tokenizer.pad_token_id == 0
    assert loaded.solver_defaults == sdxl.solver_defaults
    expected = sdxl.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    assert torch.equal(loaded.compute_clip_text_embedding("a cat")[1], sdxl.compute_clip_text_embedding("a cat")[1])


def test_an_sd15_save_pretrained_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "refiners_sd15.json").write_text("{}")
    with pytest.raises(ValueError, match=r"refiners_sd15\.json: a Stable Diffusion 1\.5 model .*StableDiffusion_1"):
        StableDiffusion_XL.from_pretrained(tmp_path)


def test_from_pretrained_resolves_a_hub_id_from_the_offline_cache(reference: Reference, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repository = cache / "models--acme--tiny-sdxl"
    shutil.copytree(reference.folder, repository / "snapshots" / ("0" * 40))
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0" * 40)
    script = "\n".join(
        (
            "from refiners_sdxl import StableDiffusion_XL",
            'sdxl = StableDiffusion_XL.from_pretrained("acme/tiny-sdxl")',
            "print(sum(p.numel() for p in sdxl.parameters()), sdxl.solver_defaults['timestep_spacing'])",
        )
    )
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = sum(p.numel() for p in StableDiffusion_XL.from_pretrained(reference.folder).parameters())
    assert result.stdout.split()[-2:] == [str(expected), "leading"]
