"""`refiners generate` end to end, in-process through `refiners_core.cli.main`, on scaled-down SD1.5 models with
random weights written with `save_pretrained` to a temporary folder; and `refiners demo`'s SD1.5 part."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from refiners_core.cli import main
from refiners_core.plugins import registry, reset_registry
from refiners_sd15 import (
    DDIM,
    StableDiffusion_1,
    StableDiffusion_1_Inpainting,
)
from refiners_sd15.demo import run_demo
from refiners_sd15.solvers import LCM, DPMSolver, DPMSolverSDE, EulerAncestral, Heun, Solver, StochasticSolver
from refiners_sd15.testing import small_sd15_components

PROMPT = "a cute cat"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15_inpainting")
    StableDiffusion_1_Inpainting(**small_sd15_components(9)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
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
    assert f"wrote {out} (64x48, 3 ddim steps, seed 2, sd15 model)" in capsys.readouterr().out
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 48))
        assert image.tobytes() == api_image(model_folder, seed=2, steps=3, size=(48, 64)).tobytes()


@pytest.mark.parametrize(
    ("solver", "name", "solver_class"),
    [
        ("DPM++ 2M Karras", "dpm++-2m-karras", DPMSolver),
        ("Euler a", "euler-a", EulerAncestral),
        ("dpmpp_2m_sde", "dpmpp_2m_sde", DPMSolverSDE),
        ("heun", "heun", Heun),
        ("lcm", "lcm", LCM),
    ],
)
def test_generate_accepts_the_new_solvers_and_their_a1111_and_comfyui_names(
    model_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    solver: str,
    name: str,
    solver_class: type[Solver],
) -> None:
    out = tmp_path / "out.png"

    code = generate(
        "--model", model_folder, "--steps", "2", "--solver", solver, "--seed", "5", "--size", "32x32", "--out", out
    )

    assert code == 0, capsys.readouterr().err
    assert f"(32x32, 2 {name} steps, seed 5" in capsys.readouterr().out
    built = registry().solvers[name].factory(num_inference_steps=2)
    assert type(built) is solver_class
    sd = StableDiffusion_1.from_pretrained(model_folder)
    sd.solver = (
        built.with_settings(generator=torch.Generator().manual_seed(6))
        if isinstance(built, StochasticSolver)
        else built
    )
    embedding = sd.compute_clip_text_embedding(PROMPT)
    with torch.no_grad():
        x = sd.init_latents(size=(32, 32), seed=5)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
    with Image.open(out) as image:
        assert image.tobytes() == sd.lda.latents_to_image(x).tobytes()  # a stochastic solver draws from seed + 1


def test_generate_refuses_an_unknown_solver_listing_the_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        generate("--model", tmp_path, "--solver", "DPM++ SDE", "--out", tmp_path / "out.png")
    error = capsys.readouterr().err
    assert "invalid choice: 'dpm++-sde'" in error and "dpm++2m-sde-karras" in error


def test_generate_with_sd15_defaults_to_512x512_and_accepts_its_model_type(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"

    assert generate("--model", model_folder, "--model-type", "sd15", "--steps", "1", "--out", out) == 0

    assert "(512x512, 1 dpm steps" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (512, 512)


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
    assert capsys.readouterr().err.startswith(
        f"refiners generate: error: --model {tmp_path}: cannot tell its model kind (no installed model kind "
        "recognizes what it holds): pass --model-type sd15"
    )

    assert generate("--model", tmp_path, "--model-type", "sd15", "--out", tmp_path / "out.png") == 2

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
        (["--steps", "0"], "--steps must be an integer from 1 to 1000"),
    ],
)
def test_generate_input_errors_are_reported_without_a_traceback(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    args = [str(tmp_path / arg) if arg.endswith(".png") else arg for arg in args]

    assert generate("--model", model_folder, *args) == 2

    assert message in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


def huge_declared_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG of `width`x`height` black pixels, a few kB on disk however large it declares itself."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\0" * ((width + 1) * height), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance", "nan"], "--guidance must be a finite number, got 'nan'"),
        (["--guidance", "inf"], "--guidance must be a finite number, got 'inf'"),
        (["--guidance=-Infinity"], "--guidance must be a finite number, got '-Infinity'"),
        (["--guidance", "1e999"], "--guidance must be a finite number"),
        (["--guidance", "1e300"], "--guidance must be in [0, 100], got '1e300'"),
        (["--guidance", "-1"], "--guidance must be in [0, 100], got '-1'"),
        (["--guidance", "strong"], "--guidance must be a finite number, got 'strong'"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 2**64-1, got '-1'"),
        (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**64-1"),
        (["--seed", "1.5"], "--seed must be an integer from 0 to 2**64-1, got '1.5'"),
        (["--seed", "9" * 5000], "--seed must be an integer from 0 to 2**64-1, got '999"),
        (["--steps", "1001"], "--steps must be an integer from 1 to 1000"),
        (["--steps", "-5"], "--steps must be an integer from 1 to 1000"),
        (["--steps", "ten"], "--steps must be an integer from 1 to 1000, got 'ten'"),
        (["--steps", "10" + "0" * 100], "--steps must be an integer from 1 to 1000"),
        (["--strength", "nan", "--init-image", "init.png"], "--strength must be a finite number, got 'nan'"),
        (["--strength", "0", "--init-image", "init.png"], "--strength must be in (0, 1], got '0'"),
        (["--strength", "1.5", "--init-image", "init.png"], "--strength must be in (0, 1], got '1.5'"),
        (["--device", "no-such-device"], "--device 'no-such-device' is not a device"),
        (["--device", "meta"], "generation runs on cpu, cuda or mps, not meta"),
        (["--device", "cuda:99"], "--device cuda:99: "),
        (["--out", "image.gif"], "unknown image extension '.gif'"),
        (["--out", "image"], "unknown image extension '(none)'"),
        (["--out", "folder.png"], "is a folder: name the image file to write"),
        (["--out", "file.txt/sub/out.png"], "is a file, so it cannot hold the image's folder"),
        (["--out", "x" * 256 + ".png"], "is longer than this file system allows"),
        (["--out", "a\0b.png"], "a path cannot contain a NUL character"),
        (["--size", "100000x100000"], "each side must be at most 8192"),
        (["--size", "8192x4096"], "more than the 16777216 (4096x4096) allowed"),
        (["--size", "60x64"], "each side must be a positive multiple of 8"),
        (["--size", "0x512"], "each side must be a positive multiple of 8"),
        (["--size", "512"], "--size must be WIDTHxHEIGHT such as 512x512, got '512'"),
        (["--size", "9" * 40 + "x8"], "--size must be WIDTHxHEIGHT"),
        (["--init-image", "wide.png"], "is 9000x8: each side must be from 1 to 8192 pixels"),
        (["--init-image", "init.png", "--mask", "wide.png"], "--mask"),
        (["--init-image", "folder.png"], "is a folder, not an image"),
        (["--init-image", "file.txt"], "cannot read it as an image"),
        (["--init-image", "init.png", "--mask", "missing.png"], "--mask"),
        (["--init-image", "huge.png"], "the size (the init image's, rounded to 8) 8192x2056"),
    ],
)
def test_generate_checks_its_arguments_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """The model given does not exist: an error about the argument proves it was checked before loading."""
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    huge_declared_png(tmp_path / "wide.png", 9000, 8)
    huge_declared_png(tmp_path / "huge.png", 8192, 2060)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("not an image")
    args = [str(tmp_path / arg) if arg.endswith((".png", ".txt")) and "/" not in arg else arg for arg in args]
    args = [str(tmp_path / arg) if arg.startswith("file.txt/") else arg for arg in args]
    args = args if "--out" in args else [*args, "--out", str(tmp_path / "out.png")]

    assert generate("--model", tmp_path / "no-such-model", *args) == 2

    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("refiners generate: error: "), error
    assert message in error
    assert "no-such-model" not in error


def test_verbose_shows_the_traceback_of_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", PROMPT, "--model", str(tmp_path / "missing"), "--steps", "0", "--out", str(tmp_path / "o.png")]

    assert main(["--verbose", *args]) == 2

    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error
    assert "GenerateError: --steps must be an integer from 1 to 1000, got '0'" in error


def test_generate_refuses_a_prompt_that_is_not_valid_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["a cat \udcff"], ["a cat", "--negative", "\ud800"]):
        assert main(["generate", *args, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")]) == 2
        error = capsys.readouterr().err
        assert "is not valid text" in error and "lone surrogate" in error, error
        assert not error.encode("utf-8", "replace").decode().count("\n") > 1


def test_generate_warns_how_many_tokens_of_a_long_prompt_are_dropped(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    code = main(
        ["generate", "cat " * 100, "--negative", "x" * 3_000_000, "--no-progress", "--model", str(model_folder)]
        + ["--steps", "1", "--size", "32x32", "--out", str(out)]
    )

    error = capsys.readouterr().err
    assert code == 0, error
    assert "warning: the prompt has 100 tokens and the text encoder reads 75: the last 25 are dropped" in error
    assert "warning: --negative has more than 1000 tokens" in error


@pytest.mark.parametrize(
    ("suffix", "image_format"), [(".png", "PNG"), (".JPG", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")]
)
def test_generate_writes_the_format_its_extension_names_over_an_existing_file(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str, image_format: str
) -> None:
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"an older file")

    assert generate("--model", model_folder, "--steps", "1", "--size", "32x32", "--out", out) == 0, capsys.readouterr()

    with Image.open(out) as image:
        assert (image.format, image.size) == (image_format, (32, 32))
    assert sorted(path.name for path in tmp_path.iterdir()) == [out.name]  # no temporary file left


def test_a_failed_write_leaves_the_existing_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refiners_sd15.generate_outputs import write_atomically

    out = tmp_path / "out.png"
    out.write_bytes(b"the previous image")

    def failing_save(self: Image.Image, fp: object, format: str | None = None, **params: object) -> None:
        fp.write(b"half an image")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(Image.new("RGB", (8, 8)), out, "PNG")

    assert out.read_bytes() == b"the previous image"
    assert [path.name for path in tmp_path.iterdir()] == ["out.png"]


NOTE_PLUGIN = """
    import sys

    import torch
    from refiners_core.plugins import GenerateOptionSpec, hookimpl

    calls = []

    def apply(model, values):
        if "broken" in values:
            raise FileNotFoundError("no such note file: broken")
        if "poison" in values:  # what a plugin scale too large for float32 does to the UNet
            torch.nn.init.constant_(next(model.unet.parameters()), float("inf"))
        calls.append((type(model).__name__, list(values)))

    def validate(values):
        if "exit" in values:
            sys.exit(0)
        if "base" in values:
            raise GeneratorExit
        if "empty" in values:
            raise ValueError()

    @hookimpl
    def refiners_register_generate_options(register):
        register(
            GenerateOptionSpec(
                "--t-note", apply, help="a test note", metavar="NOTE", models=("sd15",), validate=validate
            )
        )
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


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("exit", "--t-note exit: the plugin's code raised SystemExit(0)"),
        ("base", "--t-note base: the plugin's code raised GeneratorExit()"),
        ("empty", "--t-note empty: the plugin's code raised ValueError()"),
    ],
)
def test_a_plugin_option_that_exits_or_raises_anything_is_an_error_before_loading(
    note_plugin: Callable[[], list[object]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    value: str,
    message: str,
) -> None:
    out = tmp_path / "out.png"

    assert generate("--model", tmp_path / "no-such-model", "--t-note", value, "--out", out) == 2

    assert capsys.readouterr().err == f"refiners generate: error: {message}\n"
    assert not out.exists() and note_plugin() == []


def test_latents_that_stop_being_finite_are_an_error_and_nothing_is_written(
    note_plugin: Callable[[], list[object]], model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.png"
    out.write_bytes(b"the previous image")

    code = generate("--model", model_folder, "--steps", "2", "--size", "32x32", "--t-note", "poison", "--out", out)

    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("refiners generate: error: the latents have NaN or infinite values after step 0: ")
    assert error.count("\n") == 1 and "nothing was written" in error
    assert out.read_bytes() == b"the previous image"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.png", "site"]


def test_generate_inpaints_what_is_painted_on_a_transparent_mask(
    inpainting_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(init)
    drawn = Image.new("RGBA", (32, 32), (255, 255, 255, 0))  # white but transparent: not masked
    drawn.paste((255, 0, 0, 255), (0, 0, 16, 32))  # the left half painted red: masked
    drawn.save(mask)
    masks: list[torch.Tensor] = []
    original = StableDiffusion_1_Inpainting.set_inpainting_conditions

    def recorded(self: StableDiffusion_1_Inpainting, image: Image.Image, mask: Image.Image) -> object:
        result = original(self, image, mask)
        masks.append(result[0])
        return result

    monkeypatch.setattr(StableDiffusion_1_Inpainting, "set_inpainting_conditions", recorded)

    code = generate(
        "--model", inpainting_folder, "--steps", "1", "--init-image", init, "--mask", mask, "--out", tmp_path / "o.png"
    )

    assert code == 0, capsys.readouterr().err
    (latent_mask,) = masks
    assert latent_mask[..., :2].eq(1).all() and latent_mask[..., 2:].eq(0).all()


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
