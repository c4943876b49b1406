"""`SegmentAnything`: the image encoder, the prompt encoders and the mask decoder, with a predictor API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, WeightsError, load_tensors, resolve_path
from refiners_sam.image_encoder import VIT_B, ImageEncoder, ImageEncoderConfig
from refiners_sam.inputs import (
    Box,
    Boxes,
    Point,
    Points,
    check_boxes,
    check_image,
    check_low_res_mask,
    check_point_count,
    check_points,
)
from refiners_sam.mapping import detect_config, official_mapping
from refiners_sam.mask_decoder import MaskDecoder
from refiners_sam.preprocessing import image_to_input, logits_to_image_size
from refiners_sam.prompt_encoder import MaskEncoder, PointEncoder, PointType

MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class ImageEmbedding:
    """What `compute_image_embedding` returns and `predict` accepts in place of the image.

    `features` is the encoder's output `(1, 256, 64, 64)`; `original_size` and `input_size` are the image's
    `(height, width)` before and after resizing, which `predict` needs to bring masks back to the image's size.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SegmentAnything(fl.Module):
    """Segment Anything: `image_encoder`, `point_encoder` and `mask_encoder` (the prompt encoder), `mask_decoder`.

    `SegmentAnything(VIT_B)` (or `VIT_L`, `VIT_H`) builds the published architecture with random weights, every
    parameter on `device` with `dtype`; `from_pretrained` reads an official checkpoint.
    """

    def __init__(self, config: ImageEncoderConfig = VIT_B, device: Device = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.image_encoder = ImageEncoder.from_config(config, device=device, dtype=dtype)
        grid_size = self.image_encoder.grid_size
        self.point_encoder = PointEncoder(config.output_dim, config.image_size, device=device, dtype=dtype)
        self.mask_encoder = MaskEncoder(config.output_dim, device=device, dtype=dtype)
        self.mask_decoder = MaskDecoder(config.output_dim, grid_size, device=device, dtype=dtype)

    @property
    def config(self) -> ImageEncoderConfig:
        """The shape of the image encoder (the rest of the model is the same for every published size)."""
        return self.image_encoder.config

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        filename: str | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
    ) -> SegmentAnything:
        """Load an official checkpoint (`sam_vit_b_01ec64.pth` layout), from a file, a folder or a hub repository.

        The size (ViT-B, ViT-L, ViT-H or another shape) is read from the weights' shapes. A folder (or repository)
        must hold exactly one weights file unless `filename` names it. `.pth` files are read with
        `torch.load(weights_only=True)`: a pickle that would run code is refused. Raises FileNotFoundError when
        nothing is found, WeightsError naming the file, key and layer at fault otherwise.
        """
        path = resolve_path(path_or_repo_id, filename, revision=revision)
        if path.is_dir():
            path = _single_weights_file(path)
        tensors = load_tensors(path)
        config = detect_config(tensors, source=str(path))
        model = cls(config, device="meta", dtype=dtype)
        load_state_dict_checked(
            model,
            tensors,
            source=str(path),
            mapping=official_mapping(config),
            assign_to_device=device if device is not None else "cpu",
        )
        return model

    @torch.no_grad()
    def compute_image_embedding(self, image: Image.Image) -> ImageEmbedding:
        """Encode a PIL image once, for as many `predict` calls as wanted.

        Any mode is read by what its pixels mean (`refiners_core.images.to_rgb`: 16-bit and float images scaled by
        their range, alpha dropped). Raises TypeError for anything but a PIL image, ValueError, before the image is
        decoded, for one without pixels, over `MAX_IMAGE_PIXELS` (100 megapixels), or more than 2048 times longer
        than wide (or the reverse; its short side would vanish when resized to 1024).
        """
        image_size = self.config.image_size
        check_image(image, image_size)
        pixels, input_size = image_to_input(image, image_size, device=self.device, dtype=self.dtype)
        return ImageEmbedding(self.image_encoder(pixels), (image.height, image.width), input_size)

    @torch.no_grad()
    def predict(
        self,
        image: Image.Image | ImageEmbedding,
        foreground_points: Points | None = None,
        background_points: Points | None = None,
        box_points: Boxes | None = None,
        low_res_mask: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for the object the prompts point at: `(masks, scores, low_res_logits)`.

        `image` is a PIL image (checked as `compute_image_embedding` does) or what `compute_image_embedding` returned
        for one. Points are `(x, y)` pixel coordinates in the image: sequences of pairs or `(N, 2)` arrays or
        tensors. A box is `[(x1, y1), (x2, y2)]` (top left, bottom right; a `(B, 2, 2)` array for several), and
        several boxes all describe the one object. `low_res_mask` is a `(1, 1, 256, 256)` float logits mask, such as
        one mask of the `low_res_logits` of a previous call. With `multimask_output`, three candidate masks come
        back, else one.

        Every prompt is checked before any work: a point or a box corner outside the image (`0 <= x <= width`,
        `0 <= y <= height`, edges included) is refused, not clamped, since it is most often `(y, x)` given for
        `(x, y)`; so are NaN or infinite coordinates, bools, strings, wrongly nested points, a box whose corners
        are swapped, more than `MAX_PROMPT_POINTS` (1024) points in all, and a `low_res_mask` of another shape, of
        booleans or with NaN. Raises TypeError or ValueError naming the argument and item (`foreground_points[2]`).

        Returns the masks `(1, M, H, W)` as booleans at the image's own size, their predicted IoU `(1, M)` and
        their logits `(1, M, 256, 256)`.
        """
        # The argument types are checked at run time too, for callers without a type checker.
        if not isinstance(image, ImageEmbedding | Image.Image):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"image must be a PIL.Image.Image or an ImageEmbedding, got {type(image).__name__}")
        if isinstance(image, Image.Image):
            check_image(image, self.config.image_size)
        image_size = image.original_size if isinstance(image, ImageEmbedding) else (image.height, image.width)
        foreground = check_points(foreground_points, "foreground_points", image_size)
        background = check_points(background_points, "background_points", image_size)
        boxes = check_boxes(box_points, "box_points", image_size)
        check_point_count(len(foreground) + len(background) + 2 * len(boxes))
        grid_size = self.image_encoder.grid_size
        if low_res_mask is not None:
            check_low_res_mask(low_res_mask, (1, 1, 4 * grid_size, 4 * grid_size))
        if not isinstance(multimask_output, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"multimask_output must be a bool, got {type(multimask_output).__name__}")

        embedding = image if isinstance(image, ImageEmbedding) else self.compute_image_embedding(image)
        coordinates, labels = self._prompt_points(embedding, foreground, background, boxes)
        if low_res_mask is None:
            dense = self.mask_encoder.no_mask(1, grid_size, grid_size)
        else:
            dense = self.mask_encoder(low_res_mask.to(device=self.device, dtype=self.dtype))
        positions = self.point_encoder.positional_encoding.grid(grid_size, grid_size)
        self.mask_decoder.set_inputs(embedding.features, positions, dense)
        logits, scores = self.mask_decoder(self.point_encoder(coordinates, labels))
        selected = slice(1, None) if multimask_output else slice(0, 1)
        low_res_logits, scores = logits[:, selected], scores[:, selected]
        full_size = logits_to_image_size(
            low_res_logits, self.config.image_size, embedding.input_size, embedding.original_size
        )
        return full_size > MASK_THRESHOLD, scores, low_res_logits

    def _prompt_points(
        self,
        embedding: ImageEmbedding,
        foreground_points: list[Point],
        background_points: list[Point],
        box_points: list[Box],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates `(1, N, 2)` in the resized image's pixels and labels `(1, N)` of every (checked) prompt point."""
        points: list[Point] = []
        labels: list[int] = []
        for group, label in ((foreground_points, PointType.FOREGROUND), (background_points, PointType.BACKGROUND)):
            for point in group:
                points.append(point)
                labels.append(label)
        for box in box_points:
            points.extend(box)
            labels.extend((PointType.BOX_TOP_LEFT, PointType.BOX_BOTTOM_RIGHT))
        if points and not box_points:
            # As in SAM: without a box, a padding point ends the prompt.
            points.append((0.0, 0.0))
            labels.append(PointType.PADDING)
        (height, width), (input_height, input_width) = embedding.original_size, embedding.input_size
        scaled = [(x * (input_width / width), y * (input_height / height)) for x, y in points]
        coordinates = torch.tensor(scaled, dtype=torch.float32, device=self.device).reshape(1, -1, 2)
        return coordinates, torch.tensor([labels], dtype=torch.long, device=self.device)


def _single_weights_file(folder: Path) -> Path:
    suffixes = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in suffixes)
    if len(files) != 1:
        found = ", ".join(path.name for path in files) or "none"
        raise WeightsError(
            f"{folder} should hold exactly one weights file ({', '.join(suffixes)}), found: {found}; "
            "pass filename= to choose"
        )
    return files[0]
