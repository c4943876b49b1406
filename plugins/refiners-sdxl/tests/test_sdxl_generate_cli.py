"""`refiners generate` with SDXL models, in-process through `refiners_core.cli.main`: the kind told from what
`--model` holds (`model_index.json`, a UNet config, a single file's keys), `--model-type`, SDXL's default size and
guidance, text-to-image, image-to-image and base + `--refiner` against the Python API, and the errors raised before
anything is loaded.

The SDXL folders are `refiners_sdxl.testing.write_small_sdxl_folder`'s and `write_small_sdxl_refiner_folder`'s (small
diffusers folders with random weights); the SD1.5 one is `refiners_sd15.testing.small_sd15_components` written with
`save_pretrained`."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from refiners_core.cli import main
from refiners_sd15 import DDIM, DPMSolver, StableDiffusion_1
from refiners_sd15.cli import check_arguments, configure, model_kind
from refiners_sd15.generate_checks import GenerateError
from refiners_sd15.testing import small_sd15_components
from refiners_sdxl import StableDiffusion_XL, StableDiffusion_XL_Refiner, refiner_first_step
from refiners_sdxl.generation import detect_sdxl, detect_sdxl_refiner
from refiners_sdxl.testing import guided_steps, write_small_sdxl_folder, write_small_sdxl_refiner_folder

PROMPT = "a cute cat"
SDXL_FOUND = "model_index.json's _class_name is 'StableDiffusionXLPipeline'"


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_sdxl_refiner_folder(tmp_path_factory.mktemp("sdxl-refiner"))


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


def generate(*args: str | Path) -> int:
    return main(["generate", PROMPT, "--no-progress", *map(str, args)])


def api_image(
    folder: Path, *, seed: int, steps: int, size: tuple[int, int], init_image: Image.Image | None = None, first: int = 0
) -> Image.Image:
    """What the Python API gives for `size = (width, height)`, DDIM, an empty negative prompt and guidance 5."""
    sdxl = StableDiffusion_XL.from_pretrained(folder)
    sdxl.show_progress = False
    sdxl.solver = DDIM(num_inference_steps=steps, first_inference_step=first)
    width, height = size
    embedding, pooled = sdxl.compute_clip_text_embedding(PROMPT)
    time_ids = sdxl.time_ids(original_size=(height, width), target_size=(height, width))
    with torch.no_grad():
        x = sdxl.init_latents(size=(height, width), init_image=init_image, seed=seed)
        x = guided_steps(sdxl, x, embedding, pooled, time_ids, condition_scale=5.0)
    return sdxl.lda.latents_to_image(x)


def api_refined_image(
    base_folder: Path, refiner_folder: Path, *, fraction: float, seed: int, steps: int
) -> Image.Image:
    """What the Python API gives for base + refiner at 64x48 with DPM-Solver, the refiner on the last `fraction` of
    the schedule, the negative prompt "blurry", guidance 5."""
    base = StableDiffusion_XL.from_pretrained(base_folder)
    refiner = StableDiffusion_XL_Refiner.from_pretrained(refiner_folder)
    base.show_progress = refiner.show_progress = False
    base.solver = DPMSolver(num_inference_steps=steps)
    handover = refiner_first_step(base.solver, denoising_end=1 - fraction)
    refiner.solver = DPMSolver(num_inference_steps=steps, first_inference_step=handover)
    embedding, pooled = base.compute_clip_text_embedding(PROMPT, negative_text="blurry")
    refiner_embedding, refiner_pooled = refiner.compute_clip_text_embedding(PROMPT, negative_text="blurry")
    time_ids = base.time_ids(original_size=(48, 64), target_size=(48, 64))
    refiner_time_ids = refiner.time_ids(original_size=(48, 64))
    with torch.no_grad():
        x = base.init_latents(size=(48, 64), seed=seed)
        for step in range(handover):
            x = base(x, step=step, clip_text_embedding=embedding, pooled_text_embedding=pooled, time_ids=time_ids)
        for step in refiner.steps:
            x = refiner(x, step=step, clip_text_embedding=refiner_embedding, pooled_text_embedding=refiner_pooled,
                        time_ids=refiner_time_ids)  # fmt: skip
    return refiner.lda.latents_to_image(x)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_with_an_sdxl_folder_writes_the_image_the_python_api_gives(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"

    code = generate("--model", sdxl_folder, "--steps", "2", "--solver", "ddim", "--seed", "3", "--size", "64x48",
                    "--out", out)  # fmt: skip

    assert code == 0, capsys.readouterr().err
    assert "(64x48, 2 ddim steps, seed 3, sdxl model)" in capsys.readouterr().out
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
        expected = pixels(api_image(sdxl_folder, seed=3, steps=2, size=(64, 48)))
        assert expected.std() > 0  # the comparison means something: not a flat image
        assert np.abs(pixels(image) - expected).max() <= 1


def test_generate_with_a_refiner_writes_the_image_the_python_api_gives(
    sdxl_folder: Path, refiner_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"

    code = generate("--model", sdxl_folder, "--refiner", f"{refiner_folder}:0.5", "--negative", "blurry", "--steps",
                    "4", "--seed", "3", "--size", "64x48", "--out", out)  # fmt: skip

    assert code == 0, capsys.readouterr().err
    assert "(64x48, 4 dpm steps, seed 3, sdxl model, the last 2 by the sdxl-refiner model)" in capsys.readouterr().out
    expected = pixels(api_refined_image(sdxl_folder, refiner_folder, fraction=0.5, seed=3, steps=4))
    base_only = tmp_path / "base.png"
    assert generate("--model", sdxl_folder, "--negative", "blurry", "--steps", "4", "--seed", "3", "--size",
                    "64x48", "--out", base_only) == 0  # fmt: skip
    with Image.open(out) as image, Image.open(base_only) as base_image:
        assert expected.std() > 0  # the comparison means something: not a flat image
        assert np.abs(pixels(base_image) - expected).max() > 10  # the refiner matters
        assert np.abs(pixels(image) - expected).max() <= 1


def test_the_refiner_runs_the_last_fifth_of_the_steps_by_default(
    sdxl_folder: Path, refiner_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"

    code = generate("--model", sdxl_folder, "--refiner", refiner_folder, "--steps", "10", "--seed", "1", "--size",
                    "32x32", "--out", out)  # fmt: skip

    assert code == 0, capsys.readouterr().err
    # DPM-Solver's leading timesteps 910, 819, ..., 182, 91: the last two are below 1000 * 0.2
    assert "(32x32, 10 dpm steps, seed 1, sdxl model, the last 2 by the sdxl-refiner model)" in capsys.readouterr().out


def test_generate_from_an_init_image_with_sdxl_runs_the_steps_its_strength_leaves(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init, out = tmp_path / "init.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(init)

    code = generate("--model", sdxl_folder, "--steps", "4", "--strength", "0.5", "--solver", "ddim", "--seed", "5",
                    "--init-image", init, "--out", out)  # fmt: skip

    assert code == 0, capsys.readouterr().err
    assert "(40x32, 2 ddim steps, seed 5, sdxl model)" in capsys.readouterr().out
    with Image.open(init) as init_image, Image.open(out) as image:
        expected = api_image(sdxl_folder, seed=5, steps=4, size=(40, 32), init_image=init_image.copy(), first=2)
        text_to_image = api_image(sdxl_folder, seed=5, steps=4, size=(40, 32))
        assert np.abs(pixels(expected) - pixels(text_to_image)).max() > 10  # the init image matters
        assert np.abs(pixels(image) - pixels(expected)).max() <= 1


def test_generate_with_sdxl_defaults_to_1024x1024(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"

    assert generate("--model", sdxl_folder, "--model-type", "sdxl", "--steps", "1", "--out", out) == 0

    assert "(1024x1024, 1 dpm steps" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (1024, 1024)


def write_single_file(path: Path, key: str) -> Path:
    save_file({key: torch.zeros(1)}, str(path))
    return path


def without_model_index(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "components"
    shutil.copytree(folder, copy)
    (copy / "model_index.json").unlink()
    return copy


def test_the_kind_is_told_from_what_the_folder_or_file_holds(
    sdxl_folder: Path, sd15_folder: Path, tmp_path: Path
) -> None:
    sdxl_file = write_single_file(tmp_path / "sdxl.safetensors", "conditioner.embedders.0.transformer.x")
    sd15_file = write_single_file(tmp_path / "sd15.safetensors", "cond_stage_model.transformer.x")
    diffusers_sd15 = tmp_path / "diffusers-sd15"
    diffusers_sd15.mkdir()
    (diffusers_sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    assert model_kind(str(sdxl_folder), None) == "sdxl"
    assert model_kind(str(without_model_index(sdxl_folder, tmp_path)), None) == "sdxl"  # from unet/config.json
    assert model_kind(str(sdxl_file), None) == "sdxl"
    assert model_kind(str(sd15_folder), None) == "sd15"
    assert model_kind(str(sd15_file), None) == "sd15"
    assert model_kind(str(diffusers_sd15), None) == "sd15"
    assert model_kind(str(sdxl_folder), "sdxl") == "sdxl"
    torch.save({"state_dict": {"cond_stage_model.transformer.x": torch.zeros(1)}}, tmp_path / "sd15.ckpt")
    torch.save({"state_dict": {"conditioner.embedders.0.transformer.x": torch.zeros(1)}}, tmp_path / "sdxl.ckpt")
    assert model_kind(str(tmp_path / "sd15.ckpt"), None) == "sd15"
    assert model_kind(str(tmp_path / "sdxl.ckpt"), None) == "sdxl"


def test_a_model_whose_kind_cannot_be_told_is_an_error_asking_for_model_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "unknown.ckpt")
    (tmp_path / "notes.bin").write_text("not weights")
    out = tmp_path / "out.png"
    hint = "pass --model-type sd15|sdxl"

    for model, why in [
        (
            "acme/sdxl-finetune-never-downloaded",
            "a hub id whose model_index.json is not in the Hugging Face cache",
        ),
        (str(tmp_path / "unknown.ckpt"), "no installed model kind recognizes what it holds"),
        (str(tmp_path / "notes.bin"), "no installed model kind recognizes what it holds"),
    ]:
        assert generate("--model", model, "--out", out) == 2
        assert capsys.readouterr().err == (
            f"refiners generate: error: --model {model}: cannot tell its model kind ({why}): {hint}\n"
        )
    assert model_kind(str(tmp_path / "unknown.ckpt"), "sd15") == "sd15"  # --model-type settles it
    assert not out.exists()


@pytest.mark.parametrize(
    ("source", "model_type", "found"),
    [
        ("sdxl", "sd15", f"holds an sdxl model, not an sd15 one ({SDXL_FOUND})"),
        ("sdxl components", "sd15", "holds an sdxl model, not an sd15 one (unet/config.json has the 'text_time' added "
         "embedding, as SDXL's UNet)"),
        ("sdxl file", "sd15", "holds an sdxl model, not an sd15 one (its keys hold 'conditioner.embedders.*', SDXL's "
         "text encoders)"),
        ("sd15", "sdxl", "holds an sd15 model, not an sdxl one (it holds refiners_sd15.json)"),
        ("sd15 file", "sdxl", "holds an sd15 model, not an sdxl one (its keys hold 'cond_stage_model.*', SD1.5's text "
         "encoder)"),
    ],
)  # fmt: skip
def test_a_forced_model_type_that_the_model_does_not_hold_is_an_error_naming_what_it_holds(
    source: str,
    model_type: str,
    found: str,
    sdxl_folder: Path,
    sd15_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sources: dict[str, Callable[[], Path]] = {
        "sdxl": lambda: sdxl_folder,
        "sdxl components": lambda: without_model_index(sdxl_folder, tmp_path),
        "sdxl file": lambda: write_single_file(tmp_path / "m.safetensors", "conditioner.embedders.1.model.x"),
        "sd15": lambda: sd15_folder,
        "sd15 file": lambda: write_single_file(tmp_path / "m.safetensors", "cond_stage_model.transformer.x"),
    }
    model = sources[source]()
    out = tmp_path / "out.png"

    assert generate("--model", model, "--model-type", model_type, "--out", out) == 2

    assert capsys.readouterr().err == f"refiners generate: error: --model-type {model_type}: --model {model} {found}\n"
    assert not out.exists()


def test_an_unknown_model_type_is_an_error_listing_the_installed_kinds(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generate("--model", sdxl_folder, "--model-type", "sd3", "--out", tmp_path / "out.png") == 2

    assert capsys.readouterr().err == (
        "refiners generate: error: --model-type 'sd3' is not an installed model kind: use one of sd15, sdxl\n"
    )
    with pytest.raises(GenerateError, match="use one of sd15, sdxl"):
        model_kind(str(sdxl_folder), "SDXL")


def test_inpainting_with_sdxl_is_refused_before_loading(
    sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)

    assert generate("--model", sdxl_folder, "--init-image", image, "--mask", image, "--out", tmp_path / "o.png") == 2

    assert capsys.readouterr().err == (
        "refiners generate: error: --mask: inpainting is not supported with an sdxl model yet (only with sd15)\n"
    )


def test_refiners_plugins_lists_the_sdxl_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0

    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("refiners-sdxl ")]
    assert "models: sdxl" in line and line.rstrip().endswith("ok")


def test_generate_help_names_each_kind_and_its_default_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model-type KIND the model's kind, one of sd15, sdxl" in help_text
    assert "(default: the model's, 512x512 for sd15, 1024x1024 for sdxl; or the init image's size)" in help_text
    assert (
        "--guidance SCALE classifier-free guidance scale, 0 to 100 (default: the model's, 7.5 for sd15, 5 for sdxl)"
        in help_text
    )
    assert "(default: 0.2, as diffusers' denoising_end=0.8); for sdxl (sdxl-refiner)" in help_text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "{sd15}", "--refiner", "{refiner}"], "--refiner: an sd15 model has no refiner (refiners run "
         "after sdxl)"),
        (["--model", "{sdxl}", "--refiner", "{sdxl}"], "--refiner {sdxl} holds an sdxl model, not an sdxl-refiner "
         "one (model_index.json's _class_name is 'StableDiffusionXLPipeline')"),
        (["--model", "{refiner}"], "--model {refiner} holds an sdxl-refiner model (model_index.json's _class_name is "
         "'StableDiffusionXLImg2ImgPipeline' without text_encoder): pass it as --refiner with an sdxl model"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:abc"], "--refiner {refiner}:abc: the fraction must be a "
         "finite number, got 'abc'"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:0"], "--refiner {refiner}:0: the fraction must be in (0, 1), "
         "got '0'"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:1"], "--refiner {refiner}:1: the fraction must be in (0, 1), "
         "got '1'"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:nan"], "--refiner {refiner}:nan: the fraction must be a "
         "finite number, got 'nan'"),
        (["--model", "{sdxl}", "--refiner", ":0.5"], "--refiner ':0.5': no model before the fraction (expected "
         "MODEL or MODEL:FRACTION)"),
        (["--model", "{sdxl}", "--refiner", "{missing}:0.5"], "--refiner {missing}: no such file or folder"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:0.5", "--steps", "1"], "--refiner {refiner}, the base model "
         "denoising the first 0.5 of the schedule: denoising_end=0.5 hands over at step 1 of 1 (timestep cutoff 500, "
         "the solver starting at step 0): the refiner would run no step; use more steps or another fraction"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:0.05", "--steps", "4"], "--refiner {refiner}, the base model "
         "denoising the first 0.95 of the schedule: denoising_end=0.95 hands over at step 4 of 4 (timestep cutoff 50, "
         "the solver starting at step 0): the refiner would run no step; use more steps or another fraction"),
        (["--model", "{sdxl}", "--refiner", "{refiner}:0.9", "--steps", "4"], "--refiner {refiner}, the base model "
         "denoising the first 0.1 of the schedule: denoising_end=0.1 hands over at step 0 of 4 (timestep cutoff 900, "
         "the solver starting at step 0): the base model would run no step; use more steps or another fraction"),
    ],
)  # fmt: skip
def test_bad_refiner_arguments_are_one_line_errors_before_anything_is_loaded(
    arguments: list[str],
    message: str,
    sdxl_folder: Path,
    refiner_folder: Path,
    sd15_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    places = {"sdxl": sdxl_folder, "refiner": refiner_folder, "sd15": sd15_folder, "missing": tmp_path / "missing"}
    out = tmp_path / "out.png"

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    for cls in (StableDiffusion_XL, StableDiffusion_XL_Refiner, StableDiffusion_1):
        monkeypatch.setattr(cls, "from_pretrained", no_loading)

    assert generate(*[argument.format(**places) for argument in arguments], "--out", out) == 2

    assert capsys.readouterr().err == f"refiners generate: error: {message.format(**places)}\n"
    assert not out.exists()


def test_sdxl_generates_with_guidance_5_by_default_and_sd15_with_7_5(
    sdxl_folder: Path, sd15_folder: Path, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    configure(parser)

    def guidance(folder: Path, *options: str) -> float:
        args = parser.parse_args([PROMPT, "--model", str(folder), "--out", str(tmp_path / "o.png"), *options])
        return check_arguments(args).guidance

    assert guidance(sdxl_folder) == 5.0
    assert guidance(sd15_folder) == 7.5
    assert guidance(sdxl_folder, "--guidance", "7") == 7.0


def test_refiners_are_told_from_base_models(sdxl_folder: Path, refiner_folder: Path, tmp_path: Path) -> None:
    refiner_components = without_model_index(refiner_folder, tmp_path / "refiner")
    base_components = without_model_index(sdxl_folder, tmp_path / "base")
    own_refiner = tmp_path / "own-refiner"
    StableDiffusion_XL_Refiner.from_pretrained(refiner_folder).save_pretrained(own_refiner)

    assert detect_sdxl_refiner(str(refiner_folder)) == (
        "model_index.json's _class_name is 'StableDiffusionXLImg2ImgPipeline' without text_encoder"
    )
    assert detect_sdxl_refiner(str(refiner_components)) == (
        "unet/config.json has the 'text_time' added embedding and there is no text_encoder/, as SDXL's refiner"
    )
    assert detect_sdxl_refiner(str(own_refiner)) == "it holds refiners_sdxl_refiner.json"
    for refiner in (refiner_folder, refiner_components, own_refiner):
        assert detect_sdxl(str(refiner)) is None, refiner
    for base in (sdxl_folder, base_components):
        assert detect_sdxl_refiner(str(base)) is None, base


def test_a_single_file_refiner_is_told_apart_and_refines_as_its_folder_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refiner written both as a diffusers folder and as an original single file (`sd_xl_refiner_1.0.safetensors`'s
    layout, of `refiners_sdxl.testing`'s single-file configs, whose time ids have SDXL's 256 features): the file is
    detected as an `sdxl-refiner` (not a base model), and `--refiner FILE` writes the image `--refiner FOLDER`
    writes."""
    from safetensors.torch import save_file

    from refiners_sdxl.testing import (
        SINGLE_FILE_INPAINTING_UNET,
        SINGLE_FILE_REFINER_UNET,
        SINGLE_FILE_TEXT_G,
        SINGLE_FILE_TEXT_L,
        SINGLE_FILE_UNET,
        original_layout_checkpoint,
        sdxl_references,
    )

    references = sdxl_references(
        SINGLE_FILE_UNET, SINGLE_FILE_INPAINTING_UNET, SINGLE_FILE_REFINER_UNET, SINGLE_FILE_TEXT_L, SINGLE_FILE_TEXT_G
    )
    base_folder, _, refiner_folder = references.save_folders(tmp_path / "folders")
    single_file = tmp_path / "sd_xl_refiner.safetensors"
    refiner_tensors = original_layout_checkpoint(references.refiner_unet, references.vae, references.text_encoder_2)
    save_file(refiner_tensors, single_file)
    assert detect_sdxl(str(single_file)) is None
    assert detect_sdxl_refiner(str(single_file)) is not None
    images: list[np.ndarray] = []
    for refiner in (refiner_folder, single_file):
        out = tmp_path / f"{refiner.name}.png"
        code = generate("--model", base_folder, "--refiner", f"{refiner}:0.5", "--steps", "4", "--seed", "3",
                        "--size", "32x32", "--out", out)  # fmt: skip
        assert code == 0, capsys.readouterr().err
        with Image.open(out) as image:
            images.append(pixels(image))
    assert images[0].std() > 0
    assert np.abs(images[0] - images[1]).max() <= 1
