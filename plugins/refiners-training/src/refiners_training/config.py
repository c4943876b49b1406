"""`TrainingConfig`: what a LoRA training run needs, read from a TOML file and checked key by key.

Every key lives in a section (`[model]`, `[data]`, `[lora]`, `[training]`, `[evaluation]`, `[export]`); the README
of this package lists them all with their defaults. A key that is unknown, missing, of the wrong type or out of
range raises `ConfigError` naming the file and the `section.key` at fault.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

LayerSelection = Literal["attention", "attention+conv"]
LrScheduler = Literal["constant", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
ExportFormat = Literal["refiners", "kohya", "diffusers"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
ModelKind = Literal["auto", "sd15", "sdxl"]
CropMode = Literal["center", "random"]

# Bounds checked when a configuration is built, before anything is allocated or loaded (the README lists them).
MAX_RESOLUTION = 2048  # training and evaluation images, in pixels (4 times SD1.5's 512, twice SDXL's 1024)
MAX_RANK = 1024
MAX_BATCH_SIZE = 1024  # samples per forward pass, and forward passes per optimizer step
MAX_BATCH_PIXELS = 64 * 512 * 512  # batch_size * resolution**2: 64 images of 512x512, 4 of 2048x2048
MAX_STEPS = 10_000_000  # optimizer steps
MAX_EVALUATION_STEPS = 1000  # DDIM steps: SD1.5 and SDXL were trained on 1000 timesteps
MAX_NAME_LENGTH = 200  # `lora.name`, the stem of the exported files


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`: the weights to train on (a diffusers folder, hub id or single file) and their model kind: `"auto"`
    tells SD1.5 from SDXL by what `base` holds, as `refiners generate` does (SD1.5 when nothing tells)."""

    base: str
    kind: ModelKind = "auto"


@dataclass(frozen=True)
class DataConfig:
    """`[data]`: a folder of images with captions, resized on their short side to `resolution` pixels and cropped to
    a square: at the center, or at a random place drawn per sample from the seed (`crop = "random"`). SDXL is
    conditioned on each image's original size and crop, as it was trained."""

    path: Path
    resolution: int = 512
    crop: CropMode = "center"


@dataclass(frozen=True)
class LoraConfig:
    """`[lora]`: the LoRA to train: its name, rank, alpha (default: the rank) and target layers."""

    name: str = "lora"
    rank: int = 16
    alpha: float | None = None
    layers: LayerSelection = "attention"
    train_text_encoder: bool = False


@dataclass(frozen=True)
class OptimizationConfig:
    """`[training]`: optimisation, precision, device, seed, checkpoints and where everything is written."""

    output_dir: Path
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "no"
    device: DeviceChoice = "auto"
    seed: int = 0
    checkpoint_every: int = 500


@dataclass(frozen=True)
class EvaluationConfig:
    """`[evaluation]`: prompts rendered to PNG files at every checkpoint and at the end (none by default)."""

    prompts: list[str] = field(default_factory=lambda: [])
    negative_prompt: str = ""
    steps: int = 20
    resolution: int | None = None
    condition_scale: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class ExportConfig:
    """`[export]`: the LoRA file formats written at the end of training (and into every checkpoint if asked)."""

    formats: list[ExportFormat] = field(default_factory=lambda: ["refiners", "kohya", "diffusers"])
    at_checkpoints: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """A whole training run. Build it with `TrainingConfig.from_toml(path)` or from its sections in Python."""

    model: ModelConfig
    data: DataConfig
    training: OptimizationConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        check(self)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step for one process: `batch_size * gradient_accumulation_steps` (times the number
        of processes under torch.distributed)."""
        return self.training.batch_size * self.training.gradient_accumulation_steps

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainingConfig:
        """Read a TOML file. Relative paths in it (`data.path`, `training.output_dir`, and `model.base` when it names
        an existing file or folder) are relative to the file's folder.

        Raises FileNotFoundError for a missing file, ConfigError naming the file and key for anything invalid.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"training configuration {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist")
            )
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a valid TOML file: {error}") from error
        except RecursionError:
            raise ConfigError(f"{path}: not a valid TOML file: its arrays or tables are nested too deeply") from None
        return cls.from_dict(document, source=str(path), base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, document: dict[str, Any], *, source: str = "config", base_dir: Path | None = None
    ) -> TrainingConfig:
        """Build from a parsed TOML document (sections as dicts). Raises ConfigError naming `source` and the key."""
        hints = get_type_hints(cls)
        known = {item.name for item in dataclasses.fields(cls)}
        for name in document:
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown section [{_shown(name)}] (expected one of {', '.join(sorted(known))})"
                )
        sections: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            table = document.get(item.name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: `{item.name}` must be a [{item.name}] section")
            sections[item.name] = _section(hints[item.name], typing.cast(dict[str, Any], table), item.name, source)
        if base_dir is not None:
            sections = _resolve_paths(sections, base_dir)
        try:
            return cls(**sections)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None


def _shown(name: str) -> str:
    """A key or section name of the user's TOML as messages show it: as written when printable, else quoted with
    escapes (a key may hold a newline, and an error stays one line)."""
    return name if name.isprintable() else repr(name)


def _section(kind: type[Any], table: dict[str, Any], name: str, source: str) -> Any:
    hints = get_type_hints(kind)
    fields = {item.name: item for item in dataclasses.fields(kind)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key `{name}.{_shown(key)}` (known keys: {', '.join(fields)})")
        values[key] = _coerce(value, hints[key], f"{source}: `{name}.{key}`")
    for key, item in fields.items():
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if required and key not in values:
            raise ConfigError(f"{source}: missing required key `{name}.{key}`")
    return kind(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (bool, int, float, str, Path, a Literal, list of those, or X | None)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in get_args(hint) if option is not type(None)]
        return _coerce(value, options[0], where)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = get_args(hint)
        elements = cast(list[object], value)  # a list read from the config file: its items are checked here
        return [_coerce(element, item, f"{where}[{index}]") for index, element in enumerate(elements)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str or hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
        if hint is Path and "\0" in value:
            raise ConfigError(f"{where} must be a path, got {value!r} (it holds a NUL character)")
        return Path(value) if hint is Path else value
    raise TypeError(f"{where}: unsupported configuration type {hint!r}")


def _resolve_paths(sections: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    model, data, training = sections["model"], sections["data"], sections["training"]
    base = Path(model.base).expanduser()
    if not base.is_absolute() and (base_dir / base).exists():
        model = dataclasses.replace(model, base=str(base_dir / base))
    return sections | {
        "model": model,
        "data": dataclasses.replace(data, path=base_dir / data.path.expanduser()),
        "training": dataclasses.replace(training, output_dir=base_dir / training.output_dir.expanduser()),
    }


def check(config: TrainingConfig) -> None:
    """Raise ConfigError naming the key of the first value out of range (non-finite numbers first)."""
    for section in dataclasses.fields(config):
        table = getattr(config, section.name)
        for item in dataclasses.fields(table):
            value = getattr(table, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"`{section.name}.{item.name}` must be a finite number, got {value!r}")
    training, lora, evaluation = config.training, config.lora, config.evaluation
    rules: list[tuple[bool, str, str]] = [
        ("\0" not in config.model.base, "model.base", "a path or hub id without NUL characters"),
        (_is_resolution(config.data.resolution), "data.resolution", f"a multiple of 8 from 8 to {MAX_RESOLUTION}"),
        (1 <= lora.rank <= MAX_RANK, "lora.rank", f"from 1 to {MAX_RANK}"),
        (lora.alpha is None or lora.alpha > 0, "lora.alpha", "positive"),
        (
            _is_file_name(lora.name),
            "lora.name",
            f'a file name (at most {MAX_NAME_LENGTH} printable characters, no spaces and none of / \\ : * ? " < > |)',
        ),
        (1 <= training.max_steps <= MAX_STEPS, "training.max_steps", f"from 1 to {MAX_STEPS}"),
        (1 <= training.batch_size <= MAX_BATCH_SIZE, "training.batch_size", f"from 1 to {MAX_BATCH_SIZE}"),
        (
            training.batch_size * config.data.resolution**2 <= MAX_BATCH_PIXELS,
            "training.batch_size",
            f"at most {MAX_BATCH_PIXELS} pixels per forward pass with `data.resolution` = {config.data.resolution} "
            f"({MAX_BATCH_PIXELS // max(1, config.data.resolution) ** 2} images; "
            "`gradient_accumulation_steps` makes larger batches)",
        ),
        (
            1 <= training.gradient_accumulation_steps <= MAX_BATCH_SIZE,
            "training.gradient_accumulation_steps",
            f"from 1 to {MAX_BATCH_SIZE}",
        ),
        (0 < training.learning_rate <= 1, "training.learning_rate", "in (0, 1]"),
        (0 <= training.lr_warmup_steps <= training.max_steps, "training.lr_warmup_steps", "in [0, max_steps]"),
        (0 <= training.adam_beta1 < 1, "training.adam_beta1", "in [0, 1)"),
        (0 <= training.adam_beta2 < 1, "training.adam_beta2", "in [0, 1)"),
        (training.adam_epsilon > 0, "training.adam_epsilon", "positive"),
        (training.weight_decay >= 0, "training.weight_decay", "at least 0"),
        (training.max_grad_norm >= 0, "training.max_grad_norm", "at least 0 (0: no clipping)"),
        (training.seed >= 0, "training.seed", "at least 0"),
        (training.checkpoint_every >= 1, "training.checkpoint_every", "at least 1"),
        (1 <= evaluation.steps <= MAX_EVALUATION_STEPS, "evaluation.steps", f"from 1 to {MAX_EVALUATION_STEPS}"),
        (
            evaluation.resolution is None or _is_resolution(evaluation.resolution),
            "evaluation.resolution",
            f"a multiple of 8 from 8 to {MAX_RESOLUTION}",
        ),
        (evaluation.seed >= 0, "evaluation.seed", "at least 0"),
        (len(set(config.export.formats)) == len(config.export.formats), "export.formats", "without repeats"),
    ]
    for valid, key, expected in rules:
        if not valid:
            section, _, name = key.partition(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"`{key}` must be {expected}, got {value!r}")


def _is_resolution(pixels: int) -> bool:
    return 8 <= pixels <= MAX_RESOLUTION and pixels % 8 == 0


def _is_file_name(name: str) -> bool:
    return (
        0 < len(name) <= MAX_NAME_LENGTH
        and name.isprintable()
        and not any(c.isspace() or c in '/\\:*?"<>|' for c in name)
    )
