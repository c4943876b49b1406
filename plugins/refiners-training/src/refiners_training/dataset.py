"""`CaptionedImages`: a folder of images with captions, and the order a training run reads them in.

Captions come from a `metadata.jsonl` at the folder's root when there is one (one JSON object per line with
`file_name`, relative to the folder, and `text`: diffusers' ImageFolder convention), otherwise from a `.txt` file
beside each image (`cat.png` and `cat.txt`), searched recursively.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from refiners_sd15.autoencoder import image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file at fault."""


@dataclass(frozen=True)
class Sample:
    """One training image and its caption."""

    image: Path
    caption: str


class CaptionedImages:
    """The images of `folder` with their captions, as `(3, resolution, resolution)` tensors in [-1, 1].

    Every image is opened once when the dataset is built, so that a missing caption or an unreadable image is
    reported (DatasetError naming the file) before training starts. Images are converted to RGB, resized so that
    their short side is `resolution` and center-cropped to a square.
    """

    def __init__(self, folder: str | Path, resolution: int) -> None:
        self.folder = Path(folder)
        self.resolution = resolution
        if not self.folder.is_dir():
            raise DatasetError(f"dataset folder {self.folder} does not exist")
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
        sample = self.samples[index]
        with Image.open(sample.image) as image:
            square = center_crop(image.convert("RGB"), self.resolution)
        return image_to_tensor(square), sample.caption

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
    return torch.randperm(size, generator=generator).tolist()


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """`image` resized (Lanczos) so that its short side is `resolution`, then cropped to the central square."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _from_caption_files(folder: Path) -> list[Sample]:
    samples: list[Sample] = []
    for image in sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DatasetError(f"image {image} has no caption: expected {caption} (or a {METADATA_FILE} in {folder})")
        samples.append(Sample(image, caption.read_text(encoding="utf-8").strip()))
    return samples


def _from_metadata(metadata: Path) -> list[Sample]:
    samples: list[Sample] = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not a JSON object: {error}") from error
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a JSON object with `file_name` and `text`, got {line!r}")
        file_name, text = entry.get("file_name"), entry.get("text")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(file_name, str) or not isinstance(text, str):
            raise DatasetError(f"{where}: expected string fields `file_name` and `text`, got {line!r}")
        image = metadata.parent / file_name
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist")
        samples.append(Sample(image, text.strip()))
    return samples


def _check_readable(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
