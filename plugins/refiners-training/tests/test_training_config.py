"""The parts of a training run that need no model: the TOML configuration, the dataset and its order, the
learning-rate schedules, the noise of each sample, atomic checkpoints and the mixed-precision check."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from refiners_core.cli import main
from refiners_training import CaptionedImages, ConfigError, DatasetError, TrainingConfig, TrainingError
from refiners_training.checkpoint import latest_checkpoint, write_checkpoint
from refiners_training.config import OptimizationConfig
from refiners_training.diffusion import draw_noise
from refiners_training.optim import lr_factor
from refiners_training.trainer import check_mixed_precision, check_output_dir

FULL_TOML = """
[model]
base = "sd15"
kind = "sd15"

[data]
path = "images"
resolution = 256
crop = "random"

[lora]
name = "red"
rank = 4
alpha = 2
layers = "attention+conv"
train_text_encoder = true

[training]
output_dir = "runs/red"
max_steps = 10
batch_size = 2
gradient_accumulation_steps = 3
learning_rate = 1e-3
lr_scheduler = "cosine"
lr_warmup_steps = 2
mixed_precision = "bf16"
seed = 7
checkpoint_every = 5

[evaluation]
prompts = ["a red square", "a blue circle"]
steps = 4
resolution = 64

[export]
formats = ["kohya"]
at_checkpoints = true
"""


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_key_is_read_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "sd15").mkdir()
    config = TrainingConfig.from_toml(write_config(tmp_path, FULL_TOML))
    assert config.model.base == str(tmp_path / "sd15")
    assert config.model.kind == "sd15" and config.data.crop == "random"
    assert config.data.path == tmp_path / "images" and config.data.resolution == 256
    assert (config.lora.name, config.lora.rank, config.lora.alpha) == ("red", 4, 2.0)
    assert config.lora.layers == "attention+conv" and config.lora.train_text_encoder
    assert config.training.output_dir == tmp_path / "runs" / "red"
    assert config.training.gradient_accumulation_steps == 3 and config.global_batch_size == 6
    assert (config.training.lr_scheduler, config.training.mixed_precision) == ("cosine", "bf16")
    assert config.evaluation.prompts == ["a red square", "a blue circle"] and config.evaluation.resolution == 64
    assert config.export.formats == ["kohya"] and config.export.at_checkpoints


def test_defaults_fill_every_optional_key(tmp_path: Path) -> None:
    text = '[model]\nbase = "org/sd15"\n[data]\npath = "d"\n[training]\noutput_dir = "o"\n'
    config = TrainingConfig.from_toml(write_config(tmp_path, text))
    assert config.model.base == "org/sd15" and config.model.kind == "auto"  # a hub id stays as it is
    assert config.data.crop == "center"
    assert (config.lora.rank, config.lora.alpha, config.lora.layers) == (16, None, "attention")
    assert (config.training.max_steps, config.training.learning_rate, config.training.mixed_precision) == (
        1000,
        1e-4,
        "no",
    )
    assert config.export.formats == ["refiners", "kohya", "diffusers"]


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("rank = 4", "rank = 0", "`lora.rank` must be from 1 to 1024, got 0"),
        ("rank = 4", "rank = 100000", "`lora.rank` must be from 1 to 1024, got 100000"),
        ("rank = 4", 'rank = "4"', "`lora.rank` must be an integer, got '4'"),
        ("rank = 4", "rank = 4.5", "`lora.rank` must be an integer, got 4.5"),
        ("alpha = 2", "alpha = -inf", "`lora.alpha` must be a finite number, got -inf"),
        ('name = "red"', 'name = "red/../x"', "`lora.name` must be a file name"),
        ('name = "red"', 'name = "red\\u0000"', "`lora.name` must be a file name"),
        (
            "resolution = 256",
            "resolution = 40000",
            "`data.resolution` must be a multiple of 8 from 8 to 2048, got 40000",
        ),
        ("resolution = 256", "resolution = 0", "`data.resolution` must be a multiple of 8 from 8 to 2048, got 0"),
        ("learning_rate = 1e-3", "learning_rate = nan", "`training.learning_rate` must be a finite number, got nan"),
        ("learning_rate = 1e-3", "learning_rate = inf", "`training.learning_rate` must be a finite number, got inf"),
        ("learning_rate = 1e-3", "learning_rate = -1e-3", "`training.learning_rate` must be in (0, 1], got -0.001"),
        ("learning_rate = 1e-3", "learning_rate = 1e39", "`training.learning_rate` must be in (0, 1], got 1e+39"),
        ("learning_rate = 1e-3", 'learning_rate = "fast"', "`training.learning_rate` must be a number, got 'fast'"),
        (
            "learning_rate = 1e-3",
            "learning_rate = 1e-3\nmax_grad_norm = nan",
            "`training.max_grad_norm` must be a finite",
        ),
        ("learning_rate = 1e-3", "learning_rate = 1e-3\nadam_beta2 = 1.0", "`training.adam_beta2` must be in [0, 1)"),
        ("batch_size = 2", "batch_size = 0", "`training.batch_size` must be from 1 to 1024, got 0"),
        ("batch_size = 2", "batch_size = 1000000", "`training.batch_size` must be from 1 to 1024, got 1000000"),
        (
            "batch_size = 2",
            "batch_size = 257",
            "`training.batch_size` must be at most 16777216 pixels per forward pass with `data.resolution` = 256 (256 "
            "images; `gradient_accumulation_steps` makes larger batches), got 257",
        ),
        ("max_steps = 10", "max_steps = 0", "`training.max_steps` must be from 1 to 10000000, got 0"),
        ("max_steps = 10", "max_steps = 9223372036854775807", "`training.max_steps` must be from 1 to 10000000"),
        ("seed = 7", "seed = -1", "`training.seed` must be at least 0, got -1"),
        ('output_dir = "runs/red"', 'output_dir = "runs/\\u0000"', "`training.output_dir` must be a path"),
        ("steps = 4\n", "steps = 5000\n", "`evaluation.steps` must be from 1 to 1000, got 5000"),
        ("steps = 4\n", "steps = 4\ncondition_scale = nan\n", "`evaluation.condition_scale` must be a finite number"),
        ('lr_scheduler = "cosine"', 'lr_scheduler = "step"', "`training.lr_scheduler` must be one of"),
        ("seed = 7", "seed = 7\nsede = 8", "unknown key `training.sede`"),
        ("resolution = 256", "resolution = 100", "`data.resolution` must be a multiple of 8 from 8 to 2048, got 100"),
        ('output_dir = "runs/red"', "", "missing required key `training.output_dir`"),
        ("[export]", "[exports]", "unknown section [exports]"),
        ('kind = "sd15"', 'kind = "sd3"', "`model.kind` must be one of 'auto', 'sd15', 'sdxl', got 'sd3'"),
        ('crop = "random"', 'crop = "left"', "`data.crop` must be one of 'center', 'random', got 'left'"),
        ("steps = 4\nresolution = 64", "steps = 4\nresolution = 60", "`evaluation.resolution` must be a multiple"),
        ("steps = 4\nresolution = 64", "steps = 4\nresolution = 4096", "`evaluation.resolution` must be a multiple"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path, replace: str, by: str, message: str
) -> None:
    assert replace in FULL_TOML
    path = write_config(tmp_path, FULL_TOML.replace(replace, by, 1))
    with pytest.raises(ConfigError) as error:
        TrainingConfig.from_toml(path)
    assert str(path) in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(("resolution", "largest_batch"), [(2048, 4), (512, 64), (8, 1024)])
def test_the_pixels_of_one_forward_pass_are_bounded(tmp_path: Path, resolution: int, largest_batch: int) -> None:
    text = FULL_TOML.replace("resolution = 256", f"resolution = {resolution}")
    config = TrainingConfig.from_toml(
        write_config(tmp_path, text.replace("batch_size = 2", f"batch_size = {largest_batch}"))
    )
    assert config.training.batch_size * resolution**2 <= 64 * 512 * 512
    if largest_batch < 1024:
        with pytest.raises(ConfigError, match=r"`training.batch_size` must be at most 16777216 pixels per forward"):
            TrainingConfig.from_toml(
                write_config(tmp_path, text.replace("batch_size = 2", f"batch_size = {largest_batch + 1}"))
            )


@pytest.mark.parametrize("bad", ["resolution = 40000", "resolution = 256\nstray = 1", "resolution = nan"])
def test_the_cli_rejects_a_bad_configuration_in_one_line_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    path = write_config(tmp_path, FULL_TOML.replace("resolution = 256", bad, 1))  # `sd15` does not even exist
    assert main(["train", "lora", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"refiners train lora: error: {path}: ") and "data." in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


VALID: dict[str, dict[str, Any]] = {
    "model": {"base": "sd15"},
    "data": {"path": "images", "resolution": 256},
    "training": {"output_dir": "runs"},
}
KEYS = [
    (section.name, item.name)
    for section in dataclasses.fields(TrainingConfig)
    for item in dataclasses.fields(get_type_hints(TrainingConfig)[section.name])
]
SCALARS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=30)
    | st.sampled_from([0, 1, 8, 2048, 2056, 1024, 1025, 0.0, 1.0, 1e-4, "cpu", "bf16", "fp16", "kohya", "cosine"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(KEYS) | st.tuples(st.sampled_from(["lora", "bogus"]), st.text(max_size=8)), VALUES),
        max_size=4,
    ),
    dropped=st.lists(st.sampled_from(["model", "data", "training"]), max_size=1),
)
def test_any_toml_document_is_a_bounded_configuration_or_a_config_error(
    changes: list[tuple[tuple[str, str], Any]], dropped: list[str]
) -> None:
    document: dict[str, Any] = {name: dict(section) for name, section in VALID.items() if name not in dropped}
    for (section, key), value in changes:
        document.setdefault(section, {})[key] = value
    try:
        config = TrainingConfig.from_dict(document, source="run.toml")
    except ConfigError as error:
        assert str(error).startswith("run.toml: ") and "\n" not in str(error)
        return
    for section in dataclasses.fields(config):
        for item in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            assert not isinstance(value, float) or math.isfinite(value), (section.name, item.name, value)
    assert 8 <= config.data.resolution <= 2048 and config.data.resolution % 8 == 0
    assert config.training.batch_size * config.data.resolution**2 <= 64 * 512 * 512
    assert 1 <= config.lora.rank <= 1024 and 1 <= config.training.max_steps <= 10_000_000
    assert 0 < config.training.learning_rate <= 1 and 1 <= config.evaluation.steps <= 1000


def colour_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    Image.new("RGB", size, colour).save(path)


def test_captions_come_from_txt_files_or_metadata_jsonl(tmp_path: Path) -> None:
    colour_image(tmp_path / "a.png", (16, 16), (255, 0, 0))
    (tmp_path / "a.txt").write_text("a red square\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    colour_image(tmp_path / "sub" / "b.jpg", (16, 16), (0, 0, 255))
    (tmp_path / "sub" / "b.txt").write_text("a blue square", encoding="utf-8")
    dataset = CaptionedImages(tmp_path, resolution=8)
    assert [(s.image.name, s.caption) for s in dataset.samples] == [
        ("a.png", "a red square"),
        ("b.jpg", "a blue square"),
    ]
    entries = [{"file_name": "sub/b.jpg", "text": "blue"}, {"file_name": "a.png", "text": "red"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")
    dataset = CaptionedImages(tmp_path, resolution=8)
    assert [(s.image.name, s.caption) for s in dataset.samples] == [("b.jpg", "blue"), ("a.png", "red")]


def test_an_image_without_caption_or_a_bad_metadata_line_is_named(tmp_path: Path) -> None:
    colour_image(tmp_path / "a.png", (16, 16), (255, 0, 0))
    with pytest.raises(DatasetError, match=r"a\.png has no caption: expected .*a\.txt"):
        CaptionedImages(tmp_path, resolution=8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 1: image .*missing\.png does not exist"):
        CaptionedImages(tmp_path, resolution=8)


def captioned_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colour_image(folder / "a.png", (16, 16), (255, 0, 0))
    (folder / "a.txt").write_text("a red square", encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("a.txt", b"a red \xff square", r"a\.txt, line 1: not UTF-8 text \(byte 0xff at column 7\)"),
        ("a.txt", b"a red\nsquare \xc3(", r"a\.txt, line 2: not UTF-8 text \(byte 0xc3 at column 8\)"),
        (
            "metadata.jsonl",
            b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": "\xfe"}',
            r"metadata\.jsonl, line 2: not UTF-8",
        ),
        ("metadata.jsonl", b'\n\n{"file_name": "a.png", "text": ', r"metadata\.jsonl, line 3: not a JSON object"),
        ("metadata.jsonl", b"[" * 100_000, r"metadata\.jsonl, line 1: not a JSON object"),
        ("metadata.jsonl", b'["a.png", "red"]', r"metadata\.jsonl, line 1: expected a JSON object"),
        ("metadata.jsonl", b'{"file_name": "a.png", "text": 3}', r"line 1: expected string fields"),
        ("metadata.jsonl", b'{"file_name": "a.png", "text": "\\ud800"}', r"line 1: `text` is not valid text"),
        ("metadata.jsonl", b'{"file_name": "a.png\\u0000", "text": "x"}', r"line 1: `file_name` is not valid text"),
    ],
)
def test_undecodable_captions_and_malformed_metadata_are_named_with_their_line(
    tmp_path: Path, file: str, content: bytes, message: str
) -> None:
    folder = captioned_folder(tmp_path)
    (folder / file).write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        CaptionedImages(folder, resolution=8)


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "{outside}", "{data}/a.png"])
def test_metadata_paths_that_leave_the_dataset_folder_are_refused(tmp_path: Path, file_name: str) -> None:
    folder = captioned_folder(tmp_path / "data")
    colour_image(tmp_path / "outside.png", (16, 16), (0, 0, 255))
    (folder / "sub").mkdir()
    file_name = file_name.format(outside=tmp_path / "outside.png", data=folder)  # absolute paths, even inside
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 1: `file_name` .* leaves the dataset folder"):
        CaptionedImages(folder, resolution=8)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares `width x height` RGB pixels but holds (almost) no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height", "pil_limit"),
    [(20_000, 20_000, Image.MAX_IMAGE_PIXELS), (9000, 9000, Image.MAX_IMAGE_PIXELS), (100_000, 1000, None)],
)
def test_decompression_bombs_are_refused_from_their_header_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, height: int, pil_limit: int | None
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)  # our bound holds whatever PIL's is
    folder = captioned_folder(tmp_path)
    png_header_only(folder / "bomb.png", width, height)
    (folder / "bomb.txt").write_text("boom", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"image .*bomb\.png (is too large|is \d+x\d+ pixels, more than)"):
        CaptionedImages(folder, resolution=8)


@pytest.mark.parametrize(
    "layout",
    [
        "output_dir is a file",
        "its parent is a file",
        "checkpoints is a file",
        "samples is a file",
        "log is a folder",
        "an export is a folder",
    ],
)
def test_an_output_dir_that_cannot_hold_a_run_is_refused_naming_the_path(tmp_path: Path, layout: str) -> None:
    output_dir = tmp_path / "parent" / "run"
    if layout == "its parent is a file":
        (tmp_path / "parent").write_text("x", encoding="utf-8")
    else:
        output_dir.parent.mkdir()
    if layout == "output_dir is a file":
        output_dir.write_text("x", encoding="utf-8")
    elif layout in ("checkpoints is a file", "samples is a file"):
        output_dir.mkdir()
        (output_dir / layout.split()[0]).write_text("x", encoding="utf-8")
    elif layout == "log is a folder":
        (output_dir / "log.jsonl").mkdir(parents=True)
    elif layout == "an export is a folder":
        (output_dir / "red.kohya.safetensors").mkdir(parents=True)
    with pytest.raises(TrainingError, match=rf"`training.output_dir`: .*{tmp_path}/parent"):
        check_output_dir(output_dir, ["red.safetensors", "red.kohya.safetensors"])


def image_of_mode(mode: str) -> Image.Image:
    """A 16x16 image in `mode` whose pixels mean mid grey (16-bit, float), or red (alpha, palette)."""
    if mode == "I;16":
        return Image.frombytes("I;16", (16, 16), np.full((16, 16), 32768, dtype="<u2").tobytes())
    if mode == "F":
        return Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F")
    if mode == "RGBA":
        return Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # a transparent red: the colour is kept
    if mode == "LA":
        return Image.new("LA", (16, 16), (128, 40))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 255, 255, 0, 0])
    return palette


@pytest.mark.parametrize(
    ("mode", "suffix", "rgb"),
    [
        ("I;16", ".png", (128, 128, 128)),  # `convert("RGB")` makes it white
        ("F", ".tiff", (128, 128, 128)),  # `convert("RGB")` makes it black
        ("RGBA", ".png", (255, 0, 0)),
        ("LA", ".png", (128, 128, 128)),
        ("P", ".png", (255, 0, 0)),
    ],
)
def test_dataset_images_of_any_mode_are_read_by_what_their_pixels_mean(
    tmp_path: Path, mode: str, suffix: str, rgb: tuple[int, int, int]
) -> None:
    image_of_mode(mode).save(tmp_path / f"a{suffix}")
    with Image.open(tmp_path / f"a{suffix}") as saved:
        assert saved.mode == mode  # the file keeps the mode under test
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    pixels, _ = CaptionedImages(tmp_path, resolution=8)[0]
    expected = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, 8, 8)
    assert torch.allclose(pixels, expected, atol=1 / 127.5), (mode, pixels[:, 0, 0])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_float_image_with_non_finite_pixels_is_refused_naming_the_file(tmp_path: Path, value: float) -> None:
    captioned_folder(tmp_path)
    pixels = np.full((16, 16), 0.5, dtype=np.float32)
    pixels[3, 4] = value
    Image.fromarray(pixels, mode="F").save(tmp_path / "b.tiff")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"cannot read image .*b\.tiff: .*NaN or infinite pixels"):
        CaptionedImages(tmp_path, resolution=8)


def bad_dataset(folder: Path, fault: str) -> str:
    """Break the dataset `folder` (its captions are .txt files) with `fault`; the name of the file at fault."""
    if fault == "caption not UTF-8":
        (folder / "a.txt").write_bytes(b"\xff\xfe red")
        return "a.txt, line 1"
    if fault == "metadata not UTF-8":
        (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xe9t\xe9"}')
        return "metadata.jsonl, line 1"
    if fault == "metadata not JSON":
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name"', encoding="utf-8")
        return "metadata.jsonl, line 2"
    if fault == "metadata path out of the folder":
        (folder / "metadata.jsonl").write_text('{"file_name": "../a.png", "text": "x"}', encoding="utf-8")
        return "metadata.jsonl, line 1"
    if fault == "decompression bomb":
        png_header_only(folder / "a.png", 30_000, 30_000)
        return "a.png"
    if fault == "float image with NaN":
        Image.fromarray(np.full((16, 16), np.nan, dtype=np.float32), mode="F").save(folder / "a.tiff")
        (folder / "a.png").unlink()
        return "a.tiff"
    if fault == "caption too large":
        (folder / "a.txt").write_bytes(b"red " * 20_000)
        return "a.txt is 80000 bytes, more than the 65536"
    if fault == "truncated JPEG":
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a.jpg", quality=95)
        data = (folder / "a.jpg").read_bytes()
        (folder / "a.jpg").write_bytes(data[: len(data) // 2])
        (folder / "a.png").unlink()
        return "a.jpg"
    if fault == "not an image":
        (folder / "a.png").write_bytes(b"GIF89a but not really")
        return "a.png"
    (folder / "a.txt").unlink()
    return "a.png has no caption"


DATASET_FAULTS = [
    "caption not UTF-8",
    "metadata not UTF-8",
    "metadata not JSON",
    "metadata path out of the folder",
    "decompression bomb",
    "float image with NaN",
    "caption too large",
    "truncated JPEG",
    "not an image",
    "no caption",
]


@pytest.mark.parametrize("fault", DATASET_FAULTS)
def test_the_cli_reports_a_bad_dataset_in_one_line_naming_the_file_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    culprit = bad_dataset(captioned_folder(tmp_path / "images"), fault)
    path = write_config(tmp_path, FULL_TOML.replace('mixed_precision = "bf16"', 'mixed_precision = "no"'))
    assert main(["train", "lora", str(path)]) == 2  # `sd15` does not exist: the dataset is checked first
    out, error = capsys.readouterr()
    assert out == "" and len(error.splitlines()) == 1, error
    assert error.startswith("refiners train lora: error: ") and culprit in error, error
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("output_dir is a file", r"`training.output_dir`: .*runs/red must be a folder"),
        ("an export is a folder", r"`training.output_dir`: .*runs/red/red.kohya.safetensors must be a file"),
        (
            "earlier checkpoints",
            r".*runs/red/checkpoints already holds checkpoints \(step-000005 the newest\).*--resume",
        ),
        ("a stray latest pointer", r".*runs/red/checkpoints already holds checkpoints \(its latest pointer\)"),
        ("config is a folder", r"training configuration .*config.toml is a folder, not a file"),
        ("config nested too deeply", r"config.toml: not a valid TOML file: its arrays or tables are nested too deeply"),
        ("--fallback without --resume", r"--fallback \(fallback=True\) only applies when resuming: add --resume"),
    ],
)
def test_the_cli_reports_an_unusable_output_dir_or_config_in_one_line_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, message: str
) -> None:
    captioned_folder(tmp_path / "images")
    text = FULL_TOML.replace('mixed_precision = "bf16"', 'mixed_precision = "no"')
    path = tmp_path / "config.toml"
    if layout == "config is a folder":
        path.mkdir()
    else:
        write_config(tmp_path, text + ("x = " + "[" * 50_000 if layout == "config nested too deeply" else ""))
    output_dir = tmp_path / "runs" / "red"
    if layout == "output_dir is a file":
        output_dir.parent.mkdir()
        output_dir.write_text("x", encoding="utf-8")
    elif layout == "an export is a folder":
        (output_dir / "red.kohya.safetensors").mkdir(parents=True)
    elif layout == "earlier checkpoints":
        (output_dir / "checkpoints" / "step-000005").mkdir(parents=True)
        (output_dir / "checkpoints" / "step-000002").mkdir()
    elif layout == "a stray latest pointer":
        (output_dir / "checkpoints").mkdir(parents=True)
        (output_dir / "checkpoints" / "latest").write_text("step-000002\n", encoding="utf-8")
    extra = ["--fallback"] if layout == "--fallback without --resume" else []
    assert main(["train", "lora", str(path), *extra]) == 2  # `sd15` does not exist: nothing loads before the checks
    out, error = capsys.readouterr()
    assert out == "" and len(error.splitlines()) == 1, error
    assert error.startswith("refiners train lora: error: ") and re.search(message, error), error


@pytest.mark.parametrize("base", ["sd15", "empty-folder", "not-a-model.safetensors"])
def test_a_base_model_that_does_not_load_is_one_line_and_leaves_no_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when first imported, which model-kind detection may have done already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    captioned_folder(tmp_path / "images")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "not-a-model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    text = FULL_TOML.replace('mixed_precision = "bf16"', 'mixed_precision = "no"')
    path = write_config(tmp_path, text.replace('base = "sd15"', f'base = "{base}"'))
    assert main(["train", "lora", str(path)]) == 2
    out, error = capsys.readouterr()
    assert out == "" and len(error.splitlines()) == 1 and error.startswith("refiners train lora: error: "), error
    assert base in error, error
    assert not (tmp_path / "runs").exists()  # the run starts writing only once the model has loaded


def test_verbose_shows_the_traceback_of_a_training_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_dataset(captioned_folder(tmp_path / "images"), "caption not UTF-8")
    path = write_config(tmp_path, FULL_TOML.replace('mixed_precision = "bf16"', 'mixed_precision = "no"'))
    assert main(["--verbose", "train", "lora", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("Traceback (most recent call last):") and "DatasetError: " in error
    assert "a.txt, line 1: not UTF-8 text" in error


def test_images_are_resized_on_their_short_side_and_center_cropped(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 16), (0, 0, 255))  # blue, with a red middle half
    image.paste((255, 0, 0), (16, 0, 48, 16))
    image.save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide", encoding="utf-8")
    pixels, caption = CaptionedImages(tmp_path, resolution=8)[0]
    assert caption == "wide" and pixels.shape == (3, 8, 8)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(pixels, red.expand(3, 8, 8), atol=0.05)  # only the red middle is kept


def test_the_data_order_is_a_seeded_permutation_per_epoch_and_any_slice_matches_the_whole(tmp_path: Path) -> None:
    for index in range(5):
        colour_image(tmp_path / f"{index}.png", (8, 8), (index * 40, 0, 0))
        (tmp_path / f"{index}.txt").write_text(str(index), encoding="utf-8")
    dataset = CaptionedImages(tmp_path, resolution=8)
    order = dataset.indices(seed=3, start=0, count=15)
    for epoch in range(3):
        assert sorted(order[epoch * 5 : epoch * 5 + 5]) == list(range(5))
    assert order[:5] != order[5:10] or order[5:10] != order[10:15]
    assert dataset.indices(seed=3, start=7, count=6) == order[7:13]  # a resumed run reads on the same way
    assert dataset.indices(seed=4, start=0, count=15) != order


def test_a_sample_noise_and_timestep_depend_on_the_seed_and_its_position_only() -> None:
    noise, timesteps = draw_noise(seed=1, positions=[4, 5, 6], shape=(4, 2, 2))
    again, again_timesteps = draw_noise(seed=1, positions=[5], shape=(4, 2, 2))
    assert torch.equal(noise[1:2], again) and torch.equal(timesteps[1:2], again_timesteps)
    assert 0 <= int(timesteps.min()) and int(timesteps.max()) < 1000
    assert not torch.equal(draw_noise(seed=2, positions=[5], shape=(4, 2, 2))[0], again)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("constant", [1 / 3, 2 / 3, 1, 1, 1, 1]),
        ("linear", [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25]),
        ("cosine", [1 / 3, 2 / 3, 1, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ],
)
def test_learning_rate_schedules_warm_up_then_decay(tmp_path: Path, scheduler: str, expected: list[float]) -> None:
    config = OptimizationConfig(output_dir=tmp_path, max_steps=6, lr_warmup_steps=2, lr_scheduler=scheduler)  # pyright: ignore[reportArgumentType]
    assert [lr_factor(step, config) for step in range(6)] == pytest.approx(expected)


def test_a_failure_while_writing_a_checkpoint_leaves_the_latest_one_loadable(tmp_path: Path) -> None:
    def write(value: str) -> Callable[[Path], None]:
        def writer(folder: Path) -> None:
            (folder / "weights.txt").write_text(value, encoding="utf-8")

        return writer

    first = write_checkpoint(tmp_path, "step-000001", write("first"))

    def fail_midway(folder: Path) -> None:
        (folder / "weights.txt").write_text("half", encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, "step-000002", fail_midway)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest == first and (latest / "weights.txt").read_text(encoding="utf-8") == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest", "step-000001"]
    # A process killed mid-write leaves its temporary folder: still not the latest, and cleared by the next write.
    (tmp_path / ".tmp-step-000002-99999").mkdir()
    (tmp_path / ".tmp-step-000002-99999" / "weights.txt").write_text("ha", encoding="utf-8")
    assert latest_checkpoint(tmp_path) == first
    second = write_checkpoint(tmp_path, "step-000002", write("second"))
    assert latest_checkpoint(tmp_path) == second
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_fp16_on_the_cpu_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"`training.mixed_precision` = 'fp16' needs a CUDA device.*'bf16' or 'no'"):
        check_mixed_precision("fp16", torch.device("cpu"))
    check_mixed_precision("bf16", torch.device("cpu"))
    check_mixed_precision("no", torch.device("cpu"))
