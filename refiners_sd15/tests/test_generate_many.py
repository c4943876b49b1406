"""`refiners generate` for many images (`--num-images`, `--batch-size`, `--prompts`, `--from-image`, resuming), end to
end through `refiners_core.cli.main` on a scaled-down SD1.5 with random weights, 32x32, 2 DDIM steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refiners_core.cli import main
from refiners_sd15 import StableDiffusion_1
from refiners_sd15.generate_outputs import recorded_settings
from refiners_sd15.testing import small_sd15_components

PROMPT = "a cute cat"
SMALL = ("--steps", "2", "--solver", "ddim", "--size", "32x32", "--no-progress")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


def generate(model: Path, *args: str | Path) -> int:
    return main(["generate", "--model", str(model), *SMALL, *map(str, args)])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_an_image_of_a_batch_equals_the_same_seed_generated_alone(model_folder: Path, tmp_path: Path) -> None:
    assert (
        generate(
            model_folder,
            PROMPT,
            "--seed",
            "5",
            "--num-images",
            "3",
            "--batch-size",
            "3",
            "--out-dir",
            tmp_path / "batch",
        )
        == 0
    )
    assert generate(model_folder, PROMPT, "--seed", "7", "--out", tmp_path / "alone.png") == 0

    names = sorted(path.name for path in (tmp_path / "batch").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    first, last = pixels(tmp_path / "batch" / "00000.png"), pixels(tmp_path / "batch" / "00002.png")
    assert np.abs(first - last).max() > 10  # the seeds give different images: the comparison below means something
    # tolerance: one 8-bit level, float rounding of a batch of 3 against a batch of 1 (the same fp32 model)
    assert np.abs(last - pixels(tmp_path / "alone.png")).max() <= 1
    assert recorded_settings(tmp_path / "batch" / "00002.png")["seed"] == 7  # pyright: ignore[reportOptionalSubscript]


def test_a_prompts_file_names_outputs_and_takes_missing_settings_from_the_command_line(
    model_folder: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a dog", "id": "dog", "seed": 3, "guidance": 4},
        {"prompt": "a cat", "negative": "blurry", "size": "40x32"},
        {"prompt": "a bird", "steps": 3, "solver": "Euler"},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out"

    assert generate(model_folder, "--prompts", prompts, "--out-dir", out, "--batch-size", "4", "--seed", "10") == 0

    assert sorted(path.name for path in out.iterdir()) == ["00001.png", "00002.png", "dog.png"]
    dog, cat, bird = (recorded_settings(out / name) for name in ("dog.png", "00001.png", "00002.png"))
    assert dog is not None and cat is not None and bird is not None
    assert (dog["seed"], dog["guidance"], dog["size"], dog["steps"]) == (3, 4.0, "32x32", 2)
    assert (cat["seed"], cat["negative"], cat["size"], cat["solver"]) == (11, "blurry", "40x32", "ddim")
    assert (bird["seed"], bird["steps"], bird["solver"]) == (12, 3, "euler")
    with Image.open(out / "00001.png") as image:
        assert image.size == (40, 32)


def test_a_plain_text_prompts_file_gives_one_item_per_line(model_folder: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na cat\n")

    assert generate(model_folder, "--prompts", prompts, "--out-dir", tmp_path / "out", "--num-images", "2") == 0

    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["00000-0.png", "00000-1.png", "00001-0.png", "00001-1.png"]
    settings = recorded_settings(tmp_path / "out" / "00001-1.png")
    assert settings is not None and (settings["prompt"], settings["seed"]) == ("a cat", 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "size": "12x"}', "prompts.jsonl:2: 'size': --size must be WIDTHxHEIGHT"),
        ('{"prompt": "a", "steps": "two"}', "prompts.jsonl:2: 'steps': steps must be an integer"),
        ('{"prompt": "a", "colour": "red"}', "prompts.jsonl:2: 'colour': unknown key"),
        ('{"prompt": 3}', "prompts.jsonl:2: 'prompt': a non-empty string is required"),
        ('{"prompt": "a", "id": "../x"}', "prompts.jsonl:2: 'id': an id is a file name"),
        ('{"prompt": "a", "id": "first"}', "prompts.jsonl:2: 'id': 'first' is already the id of line 1"),
        ('{"prompt": "a",', "prompts.jsonl:2: not valid JSON"),
    ],
)
def test_a_bad_line_is_a_one_line_error_naming_file_line_and_field_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine", "id": "first"}\n' + line + "\n")
    model = tmp_path / "model"
    model.mkdir()  # an empty folder: loading it would fail, so the error comes before

    code = main(["generate", "--model", str(model), "--model-type", "sd15", "--prompts", str(prompts)])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "generated").exists()


def test_from_image_makes_the_same_pixels_again(model_folder: Path, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    assert (
        generate(
            model_folder,
            PROMPT,
            "--negative",
            "dull",
            "--init-image",
            init,
            "--strength",
            "0.6",
            "--seed",
            "9",
            "--num-images",
            "1",
            "--out-dir",
            tmp_path / "out",
        )
        == 0
    )
    original = tmp_path / "out" / "00000.png"

    assert main(["generate", "--from-image", str(original), "--out", str(tmp_path / "again.png"), "--no-progress"]) == 0

    assert np.array_equal(pixels(original), pixels(tmp_path / "again.png"))
    settings = recorded_settings(original)
    assert settings is not None
    assert settings["init_image"]["sha256"] == __import__("hashlib").sha256(init.read_bytes()).hexdigest()
    assert settings["strength"] == 0.6 and settings["negative"] == "dull"


def test_from_image_refuses_an_image_whose_init_image_changed(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "red").save(init)
    assert generate(model_folder, PROMPT, "--init-image", init, "--out", tmp_path / "one.png") == 0
    Image.new("RGB", (32, 32), "blue").save(init)

    assert main(["generate", "--from-image", str(tmp_path / "one.png")]) == 2
    assert f"{init} is not the file the image was made with" in capsys.readouterr().err


def test_a_rerun_skips_complete_outputs_and_remakes_a_damaged_or_changed_one(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert generate(model_folder, PROMPT, "--num-images", "3", "--out-dir", out) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (out / "00001.png").write_bytes(before["00001.png"][:100])  # cut short, as by a crash outside our atomic write
    capsys.readouterr()

    assert generate(model_folder, PROMPT, "--num-images", "3", "--out-dir", out) == 0

    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert generate(model_folder, PROMPT, "--num-images", "3", "--out-dir", out, "--guidance", "3") == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out


def test_a_bad_item_is_reported_and_skipped_and_the_exit_code_is_1(
    model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    prompts.write_text(
        json.dumps({"prompt": "fine", "id": "fine"})
        + "\n"
        + json.dumps({"prompt": "x", "init_image": str(broken)})
        + "\n"
    )

    code = generate(model_folder, "--prompts", prompts, "--out-dir", tmp_path / "out")

    captured = capsys.readouterr()
    assert code == 1
    assert "1 written, 0 skipped (already complete), 1 failed" in captured.out
    assert f"failed: 00001: {prompts}:2: --init-image" in captured.err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["fine.png"]
