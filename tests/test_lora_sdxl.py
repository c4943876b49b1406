# pyright: reportPrivateImportUsage=false
"""LoRA files for SDXL loaded by refiners-lora's `LoraManager` onto a `StableDiffusion_XL` read from a diffusers folder:
kohya files (`lora_unet_*` with diffusers or original `input_blocks` names, `lora_te1_*` / `lora_te2_*`, LoCon
convolutions, alphas), diffusers / PEFT files (`unet.`, `text_encoder.`, `text_encoder_2.`, alphas in
`lora_adapter_metadata`) and our own format; several at once, scales, fusing and removal; exports that diffusers'
`StableDiffusionXLPipeline.load_lora_weights` reads; `refiners generate --lora`; SD1.5 LoRAs refused by SDXL and the
reverse.

References: diffusers' `UNet2DConditionModel` and transformers' two CLIP text encoders (`refiners_sdxl.testing`'s
small SDXL configs, random weights), with every delta fused by hand (`W + scale * alpha / rank * up @ down`) or with
PEFT's adapters; outputs agree within 1e-4 of max |reference| in fp32, 3-step generations within 1e-3. One test runs
the published SDXL UNet.
"""

from __future__ import annotations

import copy
import gc
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from refiners_core.cli import main
from refiners_core.module_names import module_names
from refiners_core.testing import assert_relative_close, state_snapshot
from refiners_core.weights import WeightsError
from refiners_lora import LoraAdapter, LoraManager
from refiners_lora.testing import (
    Delta,
    assert_lora_changes_only_its_generation,
    assert_lora_free,
    fuse_by_hand,
    fused,
    linear_and_conv_layers,
    randomize_loras,
)
from refiners_lora.testing import kohya_lora as random_kohya_lora
from refiners_lora.testing import peft_lora as random_peft_lora
from refiners_sd15 import DDIM, StableDiffusion_1
from refiners_sd15.solvers import LCM, Solver, StochasticSolver
from refiners_sd15.testing import small_sd15_components
from refiners_sd15.unet import unet_config_from_diffusers
from refiners_sdxl import SDXLUNet, StableDiffusion_XL, diffusers_sdxl_unet_mapping, ldm_sdxl_unet_mapping
from refiners_sdxl.testing import (
    G_DIM,
    L_DIM,
    SDXL_BASE_UNET_CONFIG,
    SDXLReferences,
    guided_latents,
    guided_pipeline_arguments,
    our_outputs,
    reference_outputs,
    sdxl_references,
)

PROMPT = "a photograph of an astronaut riding a horse"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TOLERANCE = 1e-4

Lora = dict[str, torch.Tensor]
Models = dict[str, nn.Module]


def published_name(component: str, name: str) -> str:
    """The module path as published files write it: transformers 4.x had a `text_model.` level."""
    if component == "unet" or name == "text_projection" or name.startswith("text_model."):
        return name
    return f"text_model.{name}"


def models_of(references: SDXLReferences) -> Models:
    return {component: getattr(references, component) for component in COMPONENTS}


def ldm_names(unet: Any) -> dict[str, str]:
    """diffusers UNet module name -> the original checkpoint's (`input_blocks.4.1.proj_in`)."""
    config = unet_config_from_diffusers(dict(unet.config))
    diffusers = module_names(diffusers_sdxl_unet_mapping(config))
    ours_to_ldm = {path: ldm for ldm, path in module_names(ldm_sdxl_unet_mapping(config)).items()}
    return {name: ours_to_ldm[path] for name, path in diffusers.items()}


def kohya_lora(models: Models, seed: int, *, original_names: bool = False, rank: int = 4) -> tuple[Lora, list[Delta]]:
    """A kohya LoRA on every Linear and Conv2d (LoCon) of the UNet and both text encoders, an alpha on every other
    module; UNet names from diffusers' paths, or from the original checkpoint's (`original_names`)."""
    renamed = ldm_names(models["unet"]) if original_names else {}

    def kohya_name(component: str, name: str) -> str:
        return KOHYA_PREFIXES[component] + renamed.get(name, published_name(component, name)).replace(".", "_")

    return random_kohya_lora(linear_and_conv_layers(models), kohya_name, seed, rank=rank, std=0.1)


def peft_lora(models: Models, seed: int, rank: int = 3) -> tuple[Lora, list[Delta]]:
    """A diffusers / PEFT LoRA (`unet.*`, `text_encoder.*`, `text_encoder_2.*`, lora_A / lora_B, alpha 6 keys on the
    text encoders' modules) on every attention, feed-forward and MLP layer."""
    return random_peft_lora(
        linear_and_conv_layers(models),
        published_name,
        seed,
        rank=rank,
        std=0.1,
        alphas={"text_encoder": 6.0, "text_encoder_2": 6.0},
    )


def ours(sdxl: StableDiffusion_XL) -> list[torch.Tensor]:
    return our_outputs(sdxl, PROMPT)


def assert_matches(sdxl: StableDiffusion_XL, models: Models, tolerance: float = TOLERANCE) -> None:
    """Our UNet, text and pooled embeddings against the references', within `tolerance` of max |reference|."""
    for what, mine, reference in zip(
        ("unet", "text", "pooled"), ours(sdxl), reference_outputs(sdxl, models, PROMPT), strict=True
    ):
        assert_relative_close(mine, reference, tolerance, what=what)


@pytest.fixture(scope="module")
def references() -> SDXLReferences:
    return sdxl_references()


@pytest.fixture(scope="module")
def folder(references: SDXLReferences, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, _, _ = references.save_folders(tmp_path_factory.mktemp("sdxl_lora"))
    return base


@pytest.fixture
def sdxl(folder: Path) -> StableDiffusion_XL:
    model = StableDiffusion_XL.from_pretrained(folder)
    model.show_progress = False
    return model


def kohya_original(models: Models, seed: int) -> tuple[Lora, list[Delta]]:
    return kohya_lora(models, seed, original_names=True)


@pytest.mark.parametrize(
    "make_lora", [kohya_lora, kohya_original, peft_lora], ids=["kohya", "kohya-input-blocks", "peft"]
)
def test_a_lora_matches_the_reference_with_its_deltas_fused_by_hand(
    make_lora: Callable[[Models, int], tuple[Lora, list[Delta]]],
    sdxl: StableDiffusion_XL,
    references: SDXLReferences,
    tmp_path: Path,
) -> None:
    models = models_of(references)
    tensors, deltas = make_lora(models, 1)
    assert {delta[0] for delta in deltas} == set(COMPONENTS)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, path)
    before = state_snapshot(sdxl)
    loras = LoraManager(sdxl)
    assert loras.add("style", path, scale=0.8) == []  # every key used
    assert sum(isinstance(layer, LoraAdapter) for layer in sdxl.modules()) == len(deltas)
    assert_matches(sdxl, fused(models, (deltas, 0.8)))
    with pytest.raises(AssertionError):  # the LoRA does change the outputs
        assert_matches(sdxl, models)
    loras.set_scale("style", -0.5)
    assert_matches(sdxl, fused(models, (deltas, -0.5)))
    loras.remove("style")
    assert_lora_free(sdxl, before)
    assert_matches(sdxl, models)


def test_several_loras_at_once_in_three_formats_fuse_unfuse_and_remove_bit_for_bit(
    sdxl: StableDiffusion_XL, references: SDXLReferences
) -> None:
    models = models_of(references)
    kohya, kohya_deltas = kohya_lora(models, 1)
    peft, peft_deltas = peft_lora(models, 2)
    before = state_snapshot(sdxl)
    loras = LoraManager(sdxl)
    loras.add("kohya", kohya, scale=0.7)
    loras.add("peft", peft, scale=1.3)
    own = loras.state_dict("kohya", "refiners")  # our own format: our layer paths
    assert all(key.startswith(("unet.", "clip_text_encoder.")) for key in own)
    loras.add("own", own, scale=0.2)
    together = fused(models, (kohya_deltas, 0.7 + 0.2), (peft_deltas, 1.3))
    assert_matches(sdxl, together)
    unfused = state_snapshot(sdxl)
    loras.fuse()
    assert not any(isinstance(layer, LoraAdapter) for layer in sdxl.modules())
    assert list(sdxl.state_dict()) == list(before)
    assert_matches(sdxl, together)
    loras.unfuse()
    restored = sdxl.state_dict()
    assert all(torch.equal(restored[key], tensor) for key, tensor in unfused.items())
    loras.remove("kohya")
    loras.remove("own")
    assert_matches(sdxl, fused(models, (peft_deltas, 1.3)))
    loras.remove("peft")
    assert_lora_free(sdxl, before)


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers", "refiners"])
def test_an_exported_lora_loads_back_with_the_same_outputs(
    lora_format: str, sdxl: StableDiffusion_XL, folder: Path, references: SDXLReferences, tmp_path: Path
) -> None:
    tensors, deltas = kohya_lora(models_of(references), 1)
    LoraManager(sdxl).add("style", tensors, scale=0.6)
    path = tmp_path / "exported.safetensors"
    LoraManager(sdxl).save("style", path, format=lora_format)  # type: ignore[arg-type]
    other = StableDiffusion_XL.from_pretrained(folder)
    assert LoraManager(other).add("style", path, scale=0.6) == []
    for loaded, exported in zip(ours(other), ours(sdxl), strict=True):
        assert (loaded - exported).abs().max() <= 1e-5 * exported.abs().max()  # diffusers: alpha / rank in lora_B
    assert sum(isinstance(layer, LoraAdapter) for layer in other.modules()) == len(deltas)


_BLOCK = "down_blocks.1.attentions.0.transformer_blocks.1"
UNET_MODULES = (
    "down_blocks.1.attentions.0.proj_in",
    f"{_BLOCK}.attn1.to_q",
    f"{_BLOCK}.attn2.to_k",
    f"{_BLOCK}.attn2.to_out.0",
    f"{_BLOCK}.ff.net.0.proj",
    "up_blocks.0.attentions.1.proj_out",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.resnets.0.conv1",  # LoCon 3x3
    "up_blocks.0.resnets.0.conv_shortcut",  # LoCon 1x1
    "mid_block.resnets.0.time_emb_proj",
)
TEXT_MODULES = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.0.mlp.fc1")


def pipeline_of(references: SDXLReferences) -> StableDiffusionXLPipeline:
    """A pipeline on copies of the reference models (`load_lora_weights` and `add_adapter` patch them)."""
    copies = {component: copy.deepcopy(getattr(references, component)) for component in COMPONENTS}
    pipeline = StableDiffusionXLPipeline(**references.components(**copies), add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_models(pipeline: StableDiffusionXLPipeline) -> Models:
    return {component: getattr(pipeline, component) for component in COMPONENTS}


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_a_created_lora_saved_for_diffusers_gives_the_same_outputs_in_load_lora_weights(
    lora_format: str, sdxl: StableDiffusion_XL, references: SDXLReferences, tmp_path: Path
) -> None:
    names = sdxl.foreign_module_names("diffusers")
    paths = [names[f"unet.{module}"] for module in UNET_MODULES]
    paths += [names[f"{component}.text_model.{m}"] for component in COMPONENTS[1:] for m in TEXT_MODULES]
    adapters = LoraManager(sdxl).create("style", paths, rank=4, alpha=2.0)
    randomize_loras(adapters.values(), seed=1, std=0.2)
    path = tmp_path / "style.safetensors"
    LoraManager(sdxl).save("style", path, format=lora_format)  # type: ignore[arg-type]
    pipeline = pipeline_of(references)
    with pytest.raises(AssertionError):  # the LoRA does change the outputs
        assert_matches(sdxl, pipeline_models(pipeline))
    pipeline.load_lora_weights(str(path))
    assert_matches(sdxl, pipeline_models(pipeline))


@torch.no_grad()
def three_steps(
    sdxl: StableDiffusion_XL,
    pipeline: StableDiffusionXLPipeline,
    solver: Solver | None = None,
    scheduler: Any = None,
    guidance: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') latents after 3 steps (DDIM unless `solver` and the diffusers `scheduler` class it
    reproduces are given) with guidance `guidance` on 8x8 latents, from the same noise and our text embeddings."""
    from diffusers import DDIMScheduler

    sdxl.solver = solver if solver is not None else DDIM(num_inference_steps=3)
    if scheduler is None:
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    else:
        pipeline.scheduler = scheduler.from_config(pipeline.scheduler.config)
    if isinstance(sdxl.solver, StochasticSolver):
        sdxl.solver = sdxl.solver.with_settings(generator=torch.Generator().manual_seed(9))
    embedding, pooled = sdxl.compute_clip_text_embedding(PROMPT, negative_text="blurry")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    output: Any = pipeline(
        **guided_pipeline_arguments(embedding, pooled, steps=3, guidance_scale=guidance, size=64),
        latents=noise.clone(),
        generator=torch.Generator().manual_seed(9),  # for the noise of stochastic schedulers' steps
    )
    return guided_latents(sdxl, noise, embedding, pooled, size=64, condition_scale=guidance), output.images


def test_a_peft_lora_saved_by_diffusers_with_metadata_alphas_matches_diffusers_with_peft(
    sdxl: StableDiffusion_XL, references: SDXLReferences, tmp_path: Path
) -> None:
    """diffusers + PEFT adapters are the reference: the UNet, both text encoders and a 3-step generation."""
    pipeline = pipeline_of(references)
    plain_ours, plain_theirs = three_steps(sdxl, pipeline)
    torch.manual_seed(1)
    unet_config = LoraConfig(
        r=4, lora_alpha=2, target_modules=list(UNET_MODULES), alpha_pattern={"proj_in": 12}, init_lora_weights=False
    )
    text_config = LoraConfig(r=2, lora_alpha=5, target_modules=list(TEXT_MODULES), init_lora_weights=False)
    text_2_config = LoraConfig(r=3, lora_alpha=1, target_modules=list(TEXT_MODULES), init_lora_weights=False)
    pipeline.unet.add_adapter(unet_config)
    pipeline.text_encoder.add_adapter(text_config)
    pipeline.text_encoder_2.add_adapter(text_2_config)
    layers: dict[str, Any] = {
        "unet_lora_layers": get_peft_model_state_dict(pipeline.unet),
        "text_encoder_lora_layers": get_peft_model_state_dict(pipeline.text_encoder),
        "text_encoder_2_lora_layers": get_peft_model_state_dict(pipeline.text_encoder_2),
        "unet_lora_adapter_metadata": unet_config.to_dict(),
        "text_encoder_lora_adapter_metadata": text_config.to_dict(),
        "text_encoder_2_lora_adapter_metadata": text_2_config.to_dict(),
    }
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, **layers)
    (path,) = tmp_path.glob("*.safetensors")
    assert LoraManager(sdxl).add("peft", path) == []
    assert_matches(sdxl, pipeline_models(pipeline))
    ours, theirs = three_steps(sdxl, pipeline)
    assert (theirs - plain_theirs).abs().max() > 1e-2 * plain_theirs.abs().max()  # the LoRA changed the generation
    assert (plain_ours - plain_theirs).abs().max() <= 1e-3 * plain_theirs.abs().max()
    error, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert error <= 1e-3 * scale, f"3 steps with the LoRA: max error {error} for max |reference| {scale}"


LCM_LORA_MODULES = re.compile(
    r"lora_unet_.*_(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff_net_0_proj|ff_net_2|conv1|conv2|conv_shortcut"
    r"|downsamplers_0_conv|upsamplers_0_conv|time_emb_proj)$"
)
"""The UNet modules LCM-LoRA trains (its training script's `target_modules`): no text encoder, no time or added
embedding (diffusers' kohya reader would drop `add_embedding` keys)."""


def test_an_lcm_lora_in_the_sdxl_layout_runs_with_the_lcm_solver_as_in_diffusers(
    folder: Path, references: SDXLReferences, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LCM-LoRA for SDXL (latent-consistency/lcm-lora-sdxl) is a kohya file on the UNet only (`lora_unet_*`, LoCon
    on every Linear and Conv2d, with alphas), run with the LCM solver and guidance 1 (diffusers then skips
    classifier-free guidance, ours weighs the negative prediction by 0): 3 steps match diffusers' LCMScheduler with
    the same file through `load_lora_weights`, and `refiners generate --solver lcm --lora` runs it."""
    from diffusers import LCMScheduler

    tensors, _ = kohya_lora(models_of(references), 3)
    lora = tmp_path / "lcm_lora_sdxl.safetensors"
    modules = {key.split(".")[0] for key in tensors if LCM_LORA_MODULES.match(key.split(".")[0])}
    lcm = {key: tensor for key, tensor in tensors.items() if key.split(".")[0] in modules and "lora_" in key}
    lcm |= {f"{module}.alpha": torch.tensor(2.0) for module in modules}  # one alpha, as in the published file
    save_file(lcm, lora)
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    assert LoraManager(sdxl).add("lcm", lora) == []
    pipeline = pipeline_of(references)
    pipeline.load_lora_weights(str(lora))

    ours, theirs = three_steps(sdxl, pipeline, LCM(num_inference_steps=3), LCMScheduler, guidance=1.0)

    error, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert error <= 1e-3 * scale, f"3 LCM steps with the LCM-LoRA: max error {error} for max |reference| {scale}"

    def generate(out: Path, *options: str) -> int:
        arguments = ["--model", str(folder), "--steps", "2", "--size", "64x64", "--seed", "0", "--guidance", "1"]
        return main(["generate", PROMPT, *arguments, "--solver", "lcm", "--out", str(out), *options])

    assert generate(tmp_path / "plain.png", "--no-progress") == 0
    assert generate(tmp_path / "lcm.png", "--no-progress", "--lora", str(lora)) == 0
    assert "2 lcm steps" in capsys.readouterr().out
    plain, with_lora = (Image.open(tmp_path / name).tobytes() for name in ("plain.png", "lcm.png"))
    assert with_lora != plain


# A LoRA of another model


@pytest.fixture
def sd15() -> StableDiffusion_1:
    return StableDiffusion_1(**small_sd15_components(4))  # pyright: ignore[reportArgumentType]


def lora_of(model: StableDiffusion_1 | StableDiffusion_XL, lora_format: str, path: Path) -> Path:
    """A LoRA created on the text encoder(s) and the UNet's cross-attention of `model`, saved in `lora_format`."""
    names = model.foreign_module_names("diffusers")
    paths = dict.fromkeys(path for name, path in names.items() if name.endswith(("attn2.to_k", "self_attn.q_proj")))
    LoraManager(model).create("other", list(paths), rank=2)
    LoraManager(model).save("other", path, format=lora_format)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("lora_format", ["kohya", "diffusers"])
def test_an_sd15_lora_given_to_sdxl_and_the_reverse_name_the_model_it_was_made_for(
    lora_format: str, sdxl: StableDiffusion_XL, sd15: StableDiffusion_1, tmp_path: Path
) -> None:
    sd15_lora = lora_of(copy.deepcopy(sd15), lora_format, tmp_path / "sd15.safetensors")
    sdxl_lora = lora_of(copy.deepcopy(sdxl), lora_format, tmp_path / "sdxl.safetensors")
    cases = [(sdxl, sd15_lora, "SD1.5", "StableDiffusion_XL"), (sd15, sdxl_lora, "SDXL", "StableDiffusion_1")]
    for model, path, made_for, model_name in cases:
        if lora_format == "diffusers" and made_for == "SD1.5":
            continue  # `text_encoder.` is CLIP-L in both: only the published widths (768, 2048) tell them apart
        before = state_snapshot(model)
        for strict in (True, False):
            pattern = rf"^{re.escape(str(path))} is a LoRA for {made_for} \(.*\), (but|not for) {model_name}"
            with pytest.raises(WeightsError, match=pattern):
                LoraManager(model).add("other", path, strict=strict)
        assert_lora_free(model, before)


def test_the_published_cross_attention_widths_tell_an_sd15_lora_from_an_sdxl_one_without_text_encoder_keys(
    sdxl: StableDiffusion_XL,
) -> None:
    """A UNet-only diffusers LoRA whose `attn2.to_k` takes SD1.5's 768-wide text, given to an SDXL whose
    cross-attention takes 2048 (SDXLUNet built with the published width, on the meta device: no weights)."""
    unet = SDXLUNet(replace(sdxl.unet.config, cross_attention_dim=2048), device="meta")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{name}.lora_A.weight": torch.zeros(2, 768), f"{name}.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(WeightsError) as error:
        LoraManager(unet).add("sd15", tensors)
    assert str(error.value) == (
        f"LoRA state dict 'sd15' is a LoRA for SD1.5 ('{name}' takes 768-wide text embeddings), but SDXLUNet is "
        "SDXL (2048-wide text embeddings): nothing was loaded"
    )
    assert sdxl.unet.config.cross_attention_dim == L_DIM + G_DIM  # the small model's width is no published one


# refiners generate --lora


def test_refiners_generate_loads_sdxl_lora_files_and_refuses_an_sd15_one(
    folder: Path,
    references: SDXLReferences,
    sd15: StableDiffusion_1,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensors, _ = kohya_lora(models_of(references), 1)
    lora = tmp_path / "style.safetensors"
    save_file(tensors, lora)

    def generate(out: Path, *options: str) -> int:
        arguments = ["--model", str(folder), "--steps", "1", "--size", "64x64", "--seed", "0"]
        return main(["generate", PROMPT, *arguments, "--no-progress", "--out", str(out), *options])

    assert_lora_changes_only_its_generation(generate, tmp_path, f"{lora}:0.8")
    capsys.readouterr()
    sd15_lora = lora_of(sd15, "kohya", tmp_path / "sd15.safetensors")
    assert generate(tmp_path / "refused.png", "--lora", str(sd15_lora)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--lora {sd15_lora}" in error and "is a LoRA for SD1.5" in error
    assert not (tmp_path / "refused.png").exists()


# The published architecture


def test_the_published_sdxl_unet_with_a_full_kohya_lora_matches_the_reference(tmp_path: Path) -> None:
    """One LoCon LoRA with `input_blocks` names on every Linear and Conv2d of the published SDXL UNet (2.6 B
    parameters, 10.3 GB in float32), batch 1 on a 16x16 latent.

    One copy of the weights in memory: ours, with random weights, runs with the LoRA loaded from its file, which is
    then removed (every tensor as it was); diffusers' `UNet2DConditionModel`, built on the meta device, then takes our
    tensors as its parameters (as bench/sdxl.py does) and the deltas fused into them by hand. Run it by hand under
    `flock /work/bigmem.lock` on a shared machine.
    """
    with torch.device("meta"):
        reference: Any = UNet2DConditionModel.from_config(SDXL_BASE_UNET_CONFIG)
    tensors, deltas = kohya_lora({"unet": reference}, 1, original_names=True)
    assert len(deltas) > 700 and any(".proj_in" in delta[1] for delta in deltas)
    save_file(tensors, tmp_path / "lora.safetensors")
    del tensors
    generator = torch.Generator().manual_seed(5)
    latents, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 2048, generator=generator)
    pooled, time_ids = torch.randn(1, 1280, generator=generator), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    timestep = torch.tensor([500])
    unet = SDXLUNet().eval()
    versions = {key: (tensor.data_ptr(), tensor._version) for key, tensor in unet.state_dict().items()}
    assert LoraManager(unet).add("style", tmp_path / "lora.safetensors", scale=0.6) == []
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    unet.set_pooled_text_embedding(pooled)
    unet.set_time_ids(time_ids)
    with torch.no_grad():
        ours = unet(latents)
        LoraManager(unet).remove("style")
        plain = unet(latents)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA does change the output
    assert {key: (tensor.data_ptr(), tensor._version) for key, tensor in unet.state_dict().items()} == versions
    own = unet.state_dict()
    reference.load_state_dict(
        {theirs: own[key] for theirs, key in diffusers_sdxl_unet_mapping(unet.config).items()}, strict=True, assign=True
    )
    del unet, own
    fuse_by_hand(reference, deltas, 0.6)
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": time_ids}
        expected = reference.eval()(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample
    del reference
    gc.collect()
    error, scale = (ours - expected).abs().max().item(), expected.abs().max().item()
    assert error <= TOLERANCE * scale, f"max error {error} for max |reference| {scale}"
