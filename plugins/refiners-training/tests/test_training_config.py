"""The parts of a training run that need no model: the TOML configuration, the dataset and its order, the
learning-rate schedules, the noise of each sample, atomic checkpoints and the mixed-precision check."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from refiners_training import CaptionedImages, ConfigError, DatasetError, TrainingConfig
from refiners_training.checkpoint import latest_checkpoint, write_checkpoint
from refiners_training.config import OptimizationConfig
from refiners_training.diffusion import draw_noise
from refiners_training.optim import lr_factor
from refiners_training.trainer import check_mixed_precision

FULL_TOML = """
[model]
base = "sd15"

[data]
path = "images"
resolution = 256

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
    assert config.model.base == "org/sd15"  # a hub id stays as it is
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
        ("rank = 4", "rank = 0", "`lora.rank` must be at least 1, got 0"),
        ("rank = 4", 'rank = "4"', "`lora.rank` must be an integer, got '4'"),
        ('lr_scheduler = "cosine"', 'lr_scheduler = "step"', "`training.lr_scheduler` must be one of"),
        ("seed = 7", "seed = 7\nsede = 8", "unknown key `training.sede`"),
        ("resolution = 256", "resolution = 100", "`data.resolution` must be a multiple of 8, got 100"),
        ('output_dir = "runs/red"', "", "missing required key `training.output_dir`"),
        ("[export]", "[exports]", "unknown section [exports]"),
        ("steps = 4\nresolution = 64", "steps = 4\nresolution = 60", "`evaluation.resolution` must be a multiple"),
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
