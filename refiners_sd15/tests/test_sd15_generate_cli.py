"""`refiners generate` end to end, in-process through `refiners_core.cli.main`, on scaled-down SD1.5 models with
random weights written with `save_pretrained` to a temporary folder; and `refiners demo`'s SD1.5 part."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from refiners_core.cli import main
from refiners_core.plugins import registry, reset_registry
from refiners_sd15 import (
    DDIM,
    SD15_AUTOENCODER,
    CLIPTextEncoderConfig,
    CLIPTextEncoderL,
    SD1Autoencoder,
    SD1UNet,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
    UNetConfig,
)
from refiners_sd15.demo import run_demo

PROMPT = "a cute cat"


def small_components(in_channels: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(in_channels)
    return {
        "unet": SD1UNet(
            UNetConfig(
                in_channels=in_channels,
                block_out_channels=(32, 32),
                layers_per_block=1,
                attention_head_dim=4,
                cross_attention_dim=32,
                cross_attention_levels=(True, False),
            )
        ),
        "lda": SD1Autoencoder(replace(SD15_AUTOENCODER, block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
        "clip_text_encoder": CLIPTextEncoderL(
            CLIPTextEncoderConfig(embedding_dim=32, num_layers=1, num_attention_heads=2, feedforward_dim=64)
        ),
    }


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15_inpainting")
    StableDiffusion_1_Inpainting(**small_components(9)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


def generate(*args: str | Path) -> int:
    return main(["generate", PROMPT, "--no-progress", *map(str, args)])


def api_image(folder: Path, seed: int, steps: int, size: tuple[int, int]) -> Image.Image:
    """What the Python API gives for the CLI's defaults (DDIM here, empty negative prompt, guidance 7.5)."""
    sd = StableDiffusion_1.from_pretrained(folder)
    sd.solver = DDIM(num_inference_steps=steps)
    embedding = sd.compute_clip_text_embedding(PROMPT)
    with torch.no_grad():
        x = sd.init_latents(size=size, seed=seed)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    return sd.lda.latents_to_image(x)


def test_generate_writes_the_png_the_python_api_gives(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "images" / "cat.png"

    code = generate(
        "--model", model_folder, "--steps", "3", "--solver", "ddim", "--seed", "2", "--size", "64x48", "--out", out
    )

    assert code == 0, capsys.readouterr().err
    assert f"wrote {out} (64x48, 3 ddim steps, seed 2)" in capsys.readouterr().out
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
        assert image.tobytes() == api_image(model_folder, seed=2, steps=3, size=(48, 64)).tobytes()


def test_generate_from_an_init_image_runs_the_steps_its_strength_leaves(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (40, 36), (200, 30, 90)).save(init)  # rounded down to 40x32

    code = generate(
        "--model",
        model_folder,
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--init-image",
        init,
        "--out",
        tmp_path / "out.png",
    )

    assert code == 0, capsys.readouterr().err
    assert "(40x32, 2 dpm steps" in capsys.readouterr().out
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (40, 32)


def test_generate_inpaints_with_a_mask_and_an_inpainting_model(
    inpainting_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(init)
    Image.new("L", (32, 32), 255).save(mask)

    code = generate(
        "--model", inpainting_folder, "--steps", "2", "--solver", "euler", "--init-image", init, "--mask", mask,
        "--out", tmp_path / "out.png",
    )  # fmt: skip

    assert code == 0, capsys.readouterr().err
    assert "(32x32, 2 euler steps" in capsys.readouterr().out


def test_generate_with_a_missing_model_exits_with_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-model"

    assert generate("--model", missing, "--out", tmp_path / "out.png") == 2

    assert capsys.readouterr().err.strip() == f"refiners generate: error: --model {missing}: no such file or folder"
    assert not (tmp_path / "out.png").exists()


def test_generate_with_a_folder_that_is_not_a_model_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generate("--model", tmp_path, "--out", tmp_path / "out.png") == 2

    error = capsys.readouterr().err
    assert error.startswith(f"refiners generate: error: --model {tmp_path}: ")
    assert "unet" in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask", "mask.png"], "--mask needs --init-image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", "missing.png"], "--init-image missing.png: no such file"),
        (["--init-image", "init.png", "--strength", "0.1", "--steps", "5"], "leaves no step to run"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_generate_input_errors_are_reported_without_a_traceback(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    args = [str(tmp_path / arg) if arg.endswith(".png") else arg for arg in args]

    assert generate("--model", model_folder, *args) == 2

    assert message in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


def test_generate_rejects_a_size_that_is_not_a_multiple_of_8(
    model_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        generate("--model", model_folder, "--size", "60x64")

    assert exited.value.code == 2
    assert "multiples of 8" in capsys.readouterr().err


NOTE_PLUGIN = """
    from refiners_core.plugins import GenerateOptionSpec, hookimpl

    calls = []

    def apply(model, values):
        if "broken" in values:
            raise FileNotFoundError("no such note file: broken")
        calls.append((type(model).__name__, list(values)))

    @hookimpl
    def refiners_register_generate_options(register):
        register(GenerateOptionSpec("--t-note", apply, help="a test note", metavar="NOTE", models=("sd15",)))
        register(GenerateOptionSpec("--t-other", apply, models=("another-model",)))
"""


@pytest.fixture
def note_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[object]]]:
    """A distribution on `sys.path` whose plugin adds `--t-note` to generation commands for `sd15`."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "refiners_test_note_plugin.py").write_text(textwrap.dedent(NOTE_PLUGIN))
    info = site / "refiners_test_note-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: refiners-test-note\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[refiners]\nnote = refiners_test_note_plugin\n")
    monkeypatch.syspath_prepend(str(site))  # pyright: ignore[reportUnknownMemberType]
    reset_registry()
    yield lambda: sys.modules["refiners_test_note_plugin"].calls
    sys.modules.pop("refiners_test_note_plugin", None)
    reset_registry()


def test_plugin_generate_options_are_offered_and_applied_to_the_loaded_model(
    note_plugin: Callable[[], list[object]], model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit):
        generate("--help")
    help_text = capsys.readouterr().out
    assert "--t-note NOTE" in help_text and "a test note" in help_text
    assert "--t-other" not in help_text  # registered for another model

    code = generate(
        "--model", model_folder, "--steps", "1", "--size", "32x32", "--t-note", "a", "--t-note", "b", "--out", out
    )

    assert code == 0, capsys.readouterr().err
    assert note_plugin() == [("StableDiffusion_1", ["a", "b"])]
    assert "--t-note" in registry().generate_options


def test_a_failing_plugin_option_is_reported_with_its_flag_and_value(
    note_plugin: Callable[[], list[object]], model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"

    assert generate("--model", model_folder, "--t-note", "broken", "--out", out) == 2

    assert capsys.readouterr().err.strip() == ("refiners generate: error: --t-note broken: no such note file: broken")
    assert not out.exists()


def test_demo_generates_a_png_with_a_lora_and_restores_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = run_demo(seed=0, lora_rank=4, output_dir=tmp_path, quiet=True)

    out = capsys.readouterr().out
    assert "at a small size with random weights" in out
    assert all(passed for _, passed in checks), checks
    with Image.open(tmp_path / "refiners-demo-sd15.png") as image:
        assert image.size == (128, 128)
    if "lora" in registry().adapters:
        assert len(checks) == 4
