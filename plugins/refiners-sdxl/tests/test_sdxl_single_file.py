# pyright: reportPrivateImportUsage=false
"""Original single-file SDXL checkpoints (base, inpainting, refiner): each loads as the same model as the diffusers
folder of the same weights, its configs read from the tensors' shapes; another model's file is refused, naming the
file and what differs, before any weight is loaded; loaded with `mmap=True`, the same weights as views of the file.

The checkpoints are `refiners_sdxl.testing.original_layout_checkpoint`'s, written from small diffusers/transformers
models with random weights (`sdxl_references` of the `SINGLE_FILE_*` configs: heads of 64 channels and 256 features
per time id, which the original layout does not store); the folders are written by diffusers' pipelines'
`save_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from refiners_core.testing import CAN_READ_MAPPINGS, parameters_viewing
from refiners_core.weights import save_tensors
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.loading import PretrainedComponent
from refiners_sdxl import StableDiffusion_XL, StableDiffusion_XL_Inpainting, StableDiffusion_XL_Refiner
from refiners_sdxl.denoising import SDXLDenoisingModel
from refiners_sdxl.testing import (
    SINGLE_FILE_INPAINTING_UNET,
    SINGLE_FILE_REFINER_UNET,
    SINGLE_FILE_TEXT_G,
    SINGLE_FILE_TEXT_L,
    SINGLE_FILE_UNET,
    SMALL_VAE,
    original_layout_checkpoint,
    sdxl_references,
)


@dataclass
class Source:
    """A diffusers folder and the single file of the same weights."""

    folder: Path
    file: Path


@dataclass
class Sources:
    base: Source
    inpainting: Source
    refiner: Source


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    references = sdxl_references(
        SINGLE_FILE_UNET, SINGLE_FILE_INPAINTING_UNET, SINGLE_FILE_REFINER_UNET, SINGLE_FILE_TEXT_L, SINGLE_FILE_TEXT_G
    )
    root = tmp_path_factory.mktemp("sdxl_single_files")
    folders = references.save_folders(root)
    vae, text_encoder, text_encoder_2 = references.vae, references.text_encoder, references.text_encoder_2
    files = (root / "sd_xl_base.safetensors", root / "sd_xl_inpainting.safetensors", root / "sd_xl_refiner.safetensors")
    save_tensors(files[0], original_layout_checkpoint(references.unet, vae, text_encoder_2, text_encoder))
    save_tensors(files[1], original_layout_checkpoint(references.inpainting_unet, vae, text_encoder_2, text_encoder))
    save_tensors(files[2], original_layout_checkpoint(references.refiner_unet, vae, text_encoder_2))
    return Sources(*(Source(folder, file) for folder, file in zip(folders, files, strict=True)))


@pytest.mark.parametrize(
    "name, model_class",
    [
        ("base", StableDiffusion_XL),
        ("inpainting", StableDiffusion_XL_Inpainting),
        ("refiner", StableDiffusion_XL_Refiner),
    ],
)
def test_single_file_loads_as_the_diffusers_folder_of_the_same_weights(
    sources: Sources, name: str, model_class: type[SDXLDenoisingModel[Any]]
) -> None:
    """Same configs (but the first level's unused transformer depth: not in the weights, so (1, 2) reads as 2), every
    parameter in float64, equal to the folder's."""
    source: Source = getattr(sources, name)
    expected = model_class.from_pretrained(source.folder)
    loaded = model_class.from_pretrained(source.file, dtype=torch.float64)

    assert loaded.unet.config == replace(expected.unet.config, transformer_layers_per_block=2)
    assert loaded.lda.config == expected.lda.config and loaded.lda.config.scaling_factor == 0.13025
    assert len(text_encoder_configs(loaded)) == (1 if name == "refiner" else 2)  # CLIP-G, or CLIP-L and CLIP-G
    assert text_encoder_configs(loaded) == text_encoder_configs(expected)
    assert loaded.solver_defaults == expected.solver_defaults
    state, expected_state = loaded.state_dict(), expected.state_dict()
    assert set(state) == set(expected_state)
    assert all(tensor.dtype == torch.float64 for tensor in state.values())
    assert all(torch.equal(tensor, expected_state[key].double()) for key, tensor in state.items())


@pytest.mark.skipif(not CAN_READ_MAPPINGS, reason="reads the memory map of the process (Linux)")
@pytest.mark.parametrize(
    "name, model_class",
    [
        ("base", StableDiffusion_XL),
        ("inpainting", StableDiffusion_XL_Inpainting),
        ("refiner", StableDiffusion_XL_Refiner),
    ],
)
def test_a_single_file_loaded_with_mmap_gives_the_default_weights_as_views_of_the_file(
    sources: Sources, name: str, model_class: type[SDXLDenoisingModel[Any]]
) -> None:
    """Every parameter a view of the file (the split projections and reshaped 1x1 convolutions too), equal to the
    default load's."""
    file: Path = getattr(sources, name).file
    copied = model_class.from_pretrained(file)
    mapped = model_class.from_pretrained(file, mmap=True)

    views, copies = parameters_viewing(mapped, [file])
    assert views and not copies, f"{len(copies)} parameters copied out of the mapped file, e.g. {copies[:1]}"
    assert not parameters_viewing(copied, [file])[0]
    state, expected = mapped.state_dict(), copied.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in state.items())


def text_encoder_configs(model: SDXLDenoisingModel[Any]) -> list[Any]:
    """The configs of the model's text encoders: CLIP-L and CLIP-G for a base model, CLIP-G for a refiner."""
    return [module.config for module in model.clip_text_encoder.modules() if isinstance(module, PretrainedComponent)]


# Another model's file


BASE_TEXT_ENCODER = r"'conditioner\.embedders\.(0\.transformer|1\.model)\..*' is a text encoder of an SDXL base model"
REFINER_TEXT_ENCODER = r"'conditioner\.embedders\.0\.model\..*' is an SDXL refiner's only text encoder"
REFUSALS: dict[str, tuple[type[SDXLDenoisingModel[Any]], str, str]] = {
    "base to refiner": (
        StableDiffusion_XL_Refiner,
        "base",
        rf"sd_xl_base\.safetensors: {BASE_TEXT_ENCODER} .*not a refiner, load it with StableDiffusion_XL$",
    ),
    "refiner to base": (
        StableDiffusion_XL,
        "refiner",
        rf"sd_xl_refiner\.safetensors: {REFINER_TEXT_ENCODER} .*not a base model, "
        r"load it with StableDiffusion_XL_Refiner$",
    ),
    "refiner to inpainting": (
        StableDiffusion_XL_Inpainting,
        "refiner",
        rf"sd_xl_refiner\.safetensors: {REFINER_TEXT_ENCODER} .*load it with StableDiffusion_XL_Refiner$",
    ),
    "inpainting to base": (
        StableDiffusion_XL,
        "inpainting",
        r"sd_xl_inpainting\.safetensors: StableDiffusion_XL needs a UNet with 4 input channels, the unet takes 9 "
        r"\(in_channels\) \(an inpainting UNet: load it with StableDiffusion_XL_Inpainting\)$",
    ),
    "base to inpainting": (
        StableDiffusion_XL_Inpainting,
        "base",
        r"sd_xl_base\.safetensors: StableDiffusion_XL_Inpainting needs a UNet with 9 input channels, the unet takes 4 "
        r"\(in_channels\)$",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_another_sdxl_models_file_is_refused_naming_the_file_and_what_differs(sources: Sources, case: str) -> None:
    model_class, name, message = REFUSALS[case]
    source: Source = getattr(sources, name)
    with pytest.raises(ValueError, match=message):
        model_class.from_pretrained(source.file)


def test_a_refiner_file_whose_unet_does_not_fit_clip_g_is_refused_naming_both_widths(
    sources: Sources, tmp_path: Path
) -> None:
    """A base UNet (attending to CLIP-L + CLIP-G, 64 + 128) beside the refiner's CLIP-G: refused from the shapes."""
    base = UNet2DConditionModel(**SINGLE_FILE_UNET).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SINGLE_FILE_TEXT_G)).eval()
    mixed = tmp_path / "mixed.safetensors"
    save_tensors(mixed, original_layout_checkpoint(base, AutoencoderKL(**SMALL_VAE), text_encoder_2))
    with pytest.raises(
        ValueError, match=r"mixed\.safetensors: unet attends to 192-wide text .* text_encoder_2 gives 128"
    ):
        StableDiffusion_XL_Refiner.from_pretrained(mixed)


def test_an_sd15_checkpoint_is_refused_by_sdxl_and_an_sdxl_one_by_sd15(sources: Sources, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'conditioner\.embedders\..*' is an SDXL text encoder.*StableDiffusion_XL"):
        StableDiffusion_1.from_single_file(sources.base.file)
    sd15 = tmp_path / "sd15.safetensors"
    save_tensors(sd15, {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)})
    for model_class in (StableDiffusion_XL, StableDiffusion_XL_Refiner):
        with pytest.raises(ValueError, match=r"sd15\.safetensors: 'cond_stage_model\..*StableDiffusion_1"):
            model_class.from_pretrained(sd15)


def test_architecture_builds_what_from_pretrained_would_on_meta_from_configs_only(
    sources: Sources, tmp_path: Path
) -> None:
    loaded = StableDiffusion_XL.from_pretrained(sources.base.folder)
    assert loaded.unet.config != StableDiffusion_XL(device="meta").unet.config  # not the published architecture
    loaded.save_pretrained(tmp_path / "ours")

    for source in (sources.base.folder, tmp_path / "ours", sources.base.file):
        built = StableDiffusion_XL.architecture(source)
        expected = StableDiffusion_XL.from_pretrained(source).unet.config  # a single file reads depth (1, 2) as 2
        assert built.unet.config == expected, source
        assert text_encoder_configs(built) == text_encoder_configs(loaded), source
        assert all(parameter.is_meta for parameter in built.parameters()), source
    assert StableDiffusion_XL.architecture().unet.config == StableDiffusion_XL(device="meta").unet.config
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline"):
        StableDiffusion_XL.architecture(sources.refiner.folder)
