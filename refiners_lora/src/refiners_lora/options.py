"""`refiners generate --lora FILE[:SCALE]`: parsing, checks before loading, and loading onto the model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from refiners_core.checks import check_finite, check_weights_file
from refiners_core.weights import WeightsError, load_tensors, read_metadata
from refiners_lora.formats import parse_lora
from refiners_lora.manager import LoraManager


def parse_lora_option(value: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); the scale defaults to 1.

    A colon followed by something that is not a number belongs to the path when it is a drive letter
    (`C:\\loras\\style.safetensors`). Raises ValueError naming the value otherwise, or for a NaN or infinite scale.
    """
    head, colon, tail = value.rpartition(":")
    if not colon or Path(value).exists():
        return Path(value), 1.0
    try:
        float(tail)
    except ValueError:
        if len(head) == 1 and head.isalpha():
            return Path(value), 1.0
        raise ValueError(f"--lora {value!r}: {tail!r} is not a scale (expected FILE or FILE:SCALE)") from None
    return Path(head), check_finite(f"--lora {value!r}: the scale", tail)


def validate_lora_option(values: list[str]) -> None:
    """Check every `--lora FILE[:SCALE]` before the model is loaded: a finite scale, a readable safetensors file or
    PyTorch checkpoint (by its first bytes) whose keys are those of a LoRA format `parse_lora` knows.

    Raises ValueError (WeightsError for the file's content), FileNotFoundError or PermissionError naming the value.
    """
    for value in values:
        path, _ = parse_lora_option(value)
        check_weights_file(f"--lora {value}", path)
        try:
            metadata = read_metadata(path)  # the header first: it may refuse the file early
            parse_lora(load_tensors(path), str(path), metadata)
        except (OSError, ValueError) as error:
            raise WeightsError(f"--lora {value}: {error}") from error


def apply_lora_option(model: nn.Module, values: list[str]) -> None:
    """Load every `--lora FILE[:SCALE]` onto `model` with `LoraManager`, each named after its file's stem.

    All or nothing: if one file fails, the LoRAs loaded before it by this call are removed again. Raises
    ValueError for a malformed value, FileNotFoundError naming a missing file, WeightsError for a bad file.
    """
    parsed = [parse_lora_option(value) for value in values]
    for value, (path, _) in zip(values, parsed, strict=True):
        if not path.is_file():
            raise FileNotFoundError(f"--lora {value}: no LoRA file at {path}")
    loras = LoraManager(model)
    added: list[str] = []
    try:
        for path, scale in parsed:
            name, index = path.stem, 1
            while name in loras.names:
                index += 1
                name = f"{path.stem}-{index}"
            loras.add(name, path, scale=scale)
            added.append(name)
    except BaseException:
        for name in reversed(added):
            loras.remove(name)
        raise
