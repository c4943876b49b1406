"""The checks `refiners generate` runs on its arguments before it loads a model.

Each takes the argument as the shell gave it (a string: values are parsed here rather than by argparse, so that a
bad value is one line `refiners generate: error: ...` naming the option, as every other error) and raises
`GenerateError` naming the option, what was expected and what was given. None of them reads more than an image's
header or allocates more than the image it opens, which is bounded by `MAX_IMAGE_SIDE`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import cast

import torch
from PIL import Image

from refiners_core.checks import check_finite
from refiners_sd15.clip import CLIPTokenizer
from refiners_sd15.latent_diffusion import MAX_IMAGE_SIDE, check_image_size

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""The `--out` extensions and the format each is written in."""
MAX_STEPS = 1000
"""The most denoising steps: SD1.5's noise schedule has 1000 timesteps."""
MAX_GUIDANCE = 100.0
"""The largest `--guidance` (as ComfyUI's); larger scales only overflow the latents."""
TEMPORARY_PREFIX = ".refiners-generate-"
"""The name's prefix of the temporary file an image is written to, in `--out`'s folder, before it is renamed."""
_COUNTED_TOKENS = 1000  # tokens of a prompt counted for the warning about what the text encoder drops
_SHOWN = 60  # characters of a bad value quoted in a message


class GenerateError(Exception):
    """A problem with `refiners generate`'s input, reported as `refiners generate: error: ...` with exit code 2."""


def parse_integer(option: str, text: str, low: int, high: int, *, bounds: str | None = None) -> int:
    """`text` as an integer from `low` to `high` (`bounds` says so in the message, default `low to high`)."""
    bounds = bounds or f"from {low} to {high}"
    try:
        number = int(text)
    except ValueError:
        raise GenerateError(f"{option} must be an integer {bounds}, got {_shown(text)}") from None
    if not low <= number <= high:
        raise GenerateError(f"{option} must be an integer {bounds}, got {_shown(text)}")
    return number


def parse_number(
    option: str, text: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """`text` as a finite number in `[low, high]` (open at `low` if `low_open`, at `high` if `high_open`)."""
    try:
        number = check_finite(option, text)
    except ValueError as error:
        raise GenerateError(str(error) if len(text) <= _SHOWN else f"{option} must be a finite number") from None
    if not (low < number if low_open else low <= number) or not (number < high if high_open else number <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise GenerateError(f"{option} must be in {interval}, got {_shown(text)}")
    return number


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` as `(width, height)`, within `check_image_size`'s bounds."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*", text)
    if match is None:
        raise GenerateError(f"--size must be WIDTHxHEIGHT such as 512x512, got {_shown(text)}")
    width, height = int(match.group(1)), int(match.group(2))
    try:
        check_image_size(width, height, "--size")
    except ValueError as error:
        raise GenerateError(str(error)) from None
    return width, height


def check_text(option: str, text: str) -> None:
    """Refuse a prompt that cannot be encoded as UTF-8 (lone surrogates: bytes that were not UTF-8 in the shell)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise GenerateError(
            f"{option} is not valid text: character {error.start} is U+{ord(bad):04X}, a lone surrogate (text that "
            "was not UTF-8: check the shell's locale)"
        ) from None


def dropped_tokens_warning(option: str, text: str) -> str | None:
    """A warning saying how many tokens of `text` the text encoder's 77-token window drops, or None if none."""
    tokenizer = _tokenizer()
    window = tokenizer.sequence_length - 2
    count = tokenizer.count_tokens(text, limit=_COUNTED_TOKENS)
    if count <= window:
        return None
    more = "more than " if count >= _COUNTED_TOKENS else ""
    return (
        f"{option} has {more}{count} tokens and the text encoder reads {window}: the last {more}{count - window} are "
        "dropped"
    )


_TOKENIZERS: list[CLIPTokenizer] = []


def _tokenizer() -> CLIPTokenizer:
    if not _TOKENIZERS:
        _TOKENIZERS.append(CLIPTokenizer())
    return _TOKENIZERS[0]


def check_out(out: Path) -> str:
    """The format `out` is written in: its extension must be one of `IMAGE_FORMATS`, it must not be a folder or
    another non-regular file, its name must fit the file system, and its nearest existing folder must be writable."""
    if "\0" in str(out):
        raise GenerateError(f"--out {_shown(str(out))}: a path cannot contain a NUL character")
    folder = _nearest_folder(out)
    longest = _name_max(folder)
    for part in out.parts:
        if len(os.fsencode(part)) > longest:
            raise GenerateError(f"--out: the name {_shown(part)} is longer than this file system allows ({longest})")
    try:
        if out.is_dir():
            raise GenerateError(f"--out {out} is a folder: name the image file to write")
        image_format = IMAGE_FORMATS.get(out.suffix.lower())
        if image_format is None:
            raise GenerateError(
                f"--out {_shown(str(out))}: unknown image extension {out.suffix or '(none)'!r}: use "
                f"{', '.join(IMAGE_FORMATS)}"
            )
        if out.exists() and not out.is_file():
            raise GenerateError(f"--out {out} exists and is not a regular file: name the image file to write")
        if not folder.is_dir():
            raise GenerateError(f"--out {out}: {folder} is a file, so it cannot hold the image's folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise GenerateError(f"--out {out}: the folder {folder} is not writable")
    except OSError as error:
        raise GenerateError(f"--out {out}: {error.strerror or error}") from None
    return image_format


def _nearest_folder(out: Path) -> Path:
    """The nearest of `out`'s parents that exists (a file, when a parent is one)."""
    folder = out.absolute().parent
    while folder != folder.parent:
        try:
            if folder.exists():
                return folder
        except OSError:  # a name too long, a loop of links...
            pass
        folder = folder.parent
    return folder


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no limit reported
        return 255


def parse_device(name: str | None) -> torch.device:
    """The device to generate on: cpu, cuda (if available), cuda:N (N below the device count) or mps (if
    available); by default cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise GenerateError(f"--device {_shown(name)} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(f"--device {name}: CUDA is not available here (torch {torch.__version__}): use cpu")
        index = cast(int | None, device.index)  # None for plain "cuda", though torch's stub says int
        if index is not None and index >= torch.cuda.device_count():
            raise GenerateError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise GenerateError(f"--device {name}: MPS is not available here: use cpu")
        return device
    raise GenerateError(f"--device {name}: generation runs on cpu, cuda or mps, not {device.type}")


def first_step(steps: int, strength: float) -> int:
    """The first inference step for `strength`, as diffusers' image-to-image pipelines compute it."""
    repainted = min(int(steps * strength), steps)
    if repainted < 1:
        raise GenerateError(f"--strength {strength} with --steps {steps} leaves no step to run: raise either")
    return steps - repainted


def open_image(path: Path, option: str) -> Image.Image:
    """The image at `path`, decoded only after its declared size is checked: each side from 1 to `MAX_IMAGE_SIDE`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
                raise GenerateError(
                    f"{option} {path} is {width}x{height}: each side must be from 1 to {MAX_IMAGE_SIDE} pixels"
                )
            image.load()
            return image
    except FileNotFoundError:
        raise GenerateError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise GenerateError(f"{option} {path} is a folder, not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise GenerateError(f"{option} {path}: cannot read it as an image: {error}") from error


def multiple_of_8(size: tuple[int, int]) -> tuple[int, int]:
    """An init image's size rounded down to multiples of 8, the size generated when `--size` is not given."""
    width, height = size
    if width < 8 or height < 8:
        raise GenerateError(f"the init image is {width}x{height}: it needs at least 8x8 pixels")
    return width // 8 * 8, height // 8 * 8


def _shown(text: str) -> str:
    """`text` quoted for a message, cut if long."""
    return repr(text) if len(text) <= _SHOWN else f"{text[:_SHOWN]!r}... ({len(text)} characters)"
