"""`CaptionedImages`: a folder of images with captions, and the order a training run reads them in.

Captions come from a `metadata.jsonl` at the folder's root when there is one (one JSON object per line with
`file_name`, relative to the folder, and `text`: diffusers' ImageFolder convention), otherwise from a `.txt` file
beside each image (`cat.png` and `cat.txt`), searched recursively.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from PIL import Image, UnidentifiedImageError

from refiners_core.images import to_rgb
from refiners_sd15.autoencoder import image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
MAX_IMAGE_PIXELS = 8192 * 8192  # width * height of a dataset image, checked from its header before decoding
MAX_CAPTION_BYTES = 64 * 1024  # a `.txt` caption (CLIP reads 77 tokens of it), checked before it is read
MAX_METADATA_BYTES = 256 * 1024 * 1024  # `metadata.jsonl`: about a million captioned images


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file at fault."""


@dataclass(frozen=True)
class Sample:
    """One training image and its caption."""

    image: Path
    caption: str


@dataclass(frozen=True)
class CroppedImage:
    """A training image as the model sees it, `(3, target, target)` in [-1, 1], and what SDXL is conditioned on:
    the size of the image file, `(height, width)`, and the crop's top left corner `(top, left)` in the resized image
    (diffusers' `original_size` and `crops_coords_top_left`)."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: int

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's six micro-conditioning values, in diffusers' order: original height and width, crop top and
        left, target height and width."""
        return (*self.original_size, *self.crop_top_left, self.target, self.target)


class CaptionedImages:
    """The images of `folder` with their captions, as `(3, resolution, resolution)` tensors in [-1, 1].

    Every image is decoded once when the dataset is built, so that a missing caption, a caption that is not UTF-8
    text, an unreadable or truncated image, one of more than `MAX_IMAGE_PIXELS` pixels (a decompression bomb) or a
    float image with NaN or infinite pixels is reported (DatasetError naming the file, and the line of
    `metadata.jsonl`) before training starts. Images are converted to RGB by what their pixels mean
    (`refiners_core.images.to_rgb`: 16-bit and float images scaled by their range, alpha dropped, palettes
    expanded), resized so that their short side is `resolution` and cropped to a square (`crop`).
    """

    def __init__(self, folder: str | Path, resolution: int) -> None:
        self.folder = Path(folder)
        self.resolution = resolution
        if not self.folder.is_dir():
            problem = "is a file, not a folder" if self.folder.exists() else "does not exist"
            raise DatasetError(f"dataset folder {self.folder} {problem}")
        metadata = self.folder / METADATA_FILE
        self.samples = _from_metadata(metadata) if metadata.is_file() else _from_caption_files(self.folder)
        if not self.samples:
            raise DatasetError(f"dataset folder {self.folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        for sample in self.samples:
            _check_readable(sample.image)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """The image at `index` as a `(3, resolution, resolution)` float32 tensor in [-1, 1], and its caption."""
        return self.crop(index).pixels, self.samples[index].caption

    def crop(self, index: int, generator: torch.Generator | None = None) -> CroppedImage:
        """The image at `index` resized on its short side to `resolution` and cropped to a square: at the center, or
        at a place drawn from `generator` when one is given; with its original size and crop (SDXL's conditions)."""
        sample = self.samples[index]
        try:
            with open_image(sample.image) as image:
                rgb = to_rgb(image)
                square, top_left = resize_and_crop(rgb, self.resolution, generator)
        except (OSError, ValueError) as error:
            raise DatasetError(f"cannot read image {sample.image}: {error}") from error
        return CroppedImage(image_to_tensor(square), (rgb.height, rgb.width), top_left, self.resolution)

    def indices(self, seed: int, start: int, count: int) -> list[int]:
        """Sample indices at positions `start` to `start + count - 1` of the run's data order.

        The order is an endless sequence of epochs, each a permutation of the dataset that depends only on `seed` and
        the epoch number: position `p` is in epoch `p // len(self)`. A resumed run reads on from the position it
        stopped at and gets exactly the samples an uninterrupted run would have.
        """
        permutations: dict[int, list[int]] = {}
        result: list[int] = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, len(self))
            if epoch not in permutations:
                permutations[epoch] = epoch_permutation(seed, epoch, len(self))
            result.append(permutations[epoch][offset])
        return result


def epoch_permutation(seed: int, epoch: int, size: int) -> list[int]:
    """The order of the samples in `epoch`: a permutation of `range(size)` drawn from `(seed, epoch)` alone."""
    digest = hashlib.sha256(f"refiners-training:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    permutation = torch.randperm(size, generator=generator)
    return cast(list[int], permutation.tolist())  # pyright: ignore[reportUnknownMemberType]  # stub: a bare list


def resize_and_crop(
    image: Image.Image, resolution: int, generator: torch.Generator | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`image` resized (Lanczos) so that its short side is `resolution`, then cropped to a square: the central one,
    or one at a place drawn from `generator`. Returns the square and its top left corner `(top, left)`."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    spare_width, spare_height = size[0] - resolution, size[1] - resolution
    if generator is None:
        left, top = spare_width // 2, spare_height // 2
    else:
        top = int(torch.randint(0, spare_height + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, spare_width + 1, (1,), generator=generator).item())
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def open_image(path: Path) -> Image.Image:
    """`Image.open(path)`, refused (DatasetError naming the file) if its header declares more than
    `MAX_IMAGE_PIXELS` pixels: nothing is decoded before the check."""
    try:
        with warnings.catch_warnings():  # PIL warns of images it still opens: the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DatasetError(f"image {path} is too large to decode safely: {error}") from error
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise DatasetError(
            f"image {path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} pixels a dataset image may "
            "have (a decompression bomb?): resize it first"
        )
    return image


def _from_caption_files(folder: Path) -> list[Sample]:
    samples: list[Sample] = []
    for image in sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DatasetError(f"image {image} has no caption: expected {caption} (or a {METADATA_FILE} in {folder})")
        samples.append(Sample(image, _read_text(caption, MAX_CAPTION_BYTES).strip()))
    return samples


def _from_metadata(metadata: Path) -> list[Sample]:
    samples: list[Sample] = []
    for number, line in enumerate(_read_text(metadata, MAX_METADATA_BYTES).split("\n"), start=1):
        where = f"{metadata}, line {number}"
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise DatasetError(f"{where}: not a JSON object: {error}") from error
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a JSON object with `file_name` and `text`, got {line[:200]!r}")
        file_name, text = entry.get("file_name"), entry.get("text")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(file_name, str) or not isinstance(text, str):
            raise DatasetError(f"{where}: expected string fields `file_name` and `text`, got {line[:200]!r}")
        for key, value in (("file_name", file_name), ("text", text)):
            if not _is_text(value):
                raise DatasetError(f"{where}: `{key}` is not valid text (a lone surrogate or NUL character)")
        relative = Path(file_name)
        if relative.is_absolute() or relative.drive or ".." in relative.parts:
            raise DatasetError(f"{where}: `file_name` {file_name!r} leaves the dataset folder {metadata.parent}")
        image = metadata.parent / relative
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist")
        samples.append(Sample(image, text.strip()))
    return samples


def _read_text(path: Path, limit: int) -> str:
    """The UTF-8 text of `path`; DatasetError naming the file if it is larger than `limit` bytes (before reading
    it), or naming the line and column of the first byte that is not UTF-8."""
    size = path.stat().st_size
    if size > limit:
        raise DatasetError(f"{path} is {size} bytes, more than the {limit} bytes such a file may have")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DatasetError(
            f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x} at column {column})"
        ) from error


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in value


def _check_readable(path: Path) -> None:
    """DatasetError naming `path` if it is not an image PIL decodes whole (a truncated file, a bad checksum), or a
    float image with non-finite pixels: decoded once, one image at a time, so that no such error waits for
    training to reach the image."""
    try:
        with open_image(path) as image:
            image.verify()
        with open_image(path) as image:
            image.load()
            if image.mode == "F":  # the one mode whose pixel values can make `to_rgb` fail
                to_rgb(image)
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
