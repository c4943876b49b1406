# pyright: basic
# (segment-anything, which this testing module builds references from, has no type information.)
"""Helpers for tests and benches of refiners-sam: the reference, segment-anything, importable without torchvision,
and random weights for it. Needs segment-anything (test extra); nothing here is used at runtime. Import
segment-anything's names from here (or after this module), so that the stand-in is in place first.

segment-anything imports torchvision at the top of two modules, for `resize` and `to_pil_image` (used by
`SamPredictor` to resize the image) and for box helpers of the automatic mask generator, which we never call.
torchvision wheels are built against one torch release and do not import beside the CPU torch of the test
environment, so when it cannot be imported a minimal stand-in is put in `sys.modules` first. Its `resize` does what
torchvision's does for a PIL image and an explicit `(height, width)`: PIL's bilinear resampling (PIL always
antialiases when it shrinks).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from PIL import Image
from torch import nn


def install_torchvision_stand_in() -> None:
    """Put a minimal torchvision in `sys.modules` unless the real one imports (see the module docstring): called
    when this module is imported, before segment-anything is."""
    try:
        import torchvision  # noqa: F401  # pyright: ignore[reportMissingImports, reportUnusedImport]

        return
    except Exception:  # not installed, or built for another torch
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]

    def resize(image: Image.Image, size: list[int] | tuple[int, int]) -> Image.Image:
        height, width = size
        return image.resize((width, height), Image.Resampling.BILINEAR)

    def to_pil_image(array: Any) -> Image.Image:
        return Image.fromarray(array)

    def unused(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("torchvision stand-in: only resize and to_pil_image are provided")

    modules = {
        name: types.ModuleType(name)
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        + ("torchvision.ops", "torchvision.ops.boxes")
    }
    functional = modules["torchvision.transforms.functional"]
    functional.resize = resize  # type: ignore[attr-defined]
    functional.to_pil_image = to_pil_image  # type: ignore[attr-defined]
    boxes = modules["torchvision.ops.boxes"]
    boxes.batched_nms = unused  # type: ignore[attr-defined]
    boxes.box_area = unused  # type: ignore[attr-defined]
    sys.modules.update(modules)


install_torchvision_stand_in()

from segment_anything import SamPredictor, sam_model_registry  # noqa: E402
from segment_anything.modeling import Sam  # noqa: E402
from segment_anything.modeling.image_encoder import (  # noqa: E402
    Attention,
    ImageEncoderViT,
    window_partition,
    window_unpartition,
)

__all__ = [
    "Attention",
    "ImageEncoderViT",
    "Sam",
    "SamPredictor",
    "build_reference",
    "build_tiny_reference",
    "install_torchvision_stand_in",
    "randomize",
    "sam_model_registry",
    "window_partition",
    "window_unpartition",
]


def randomize(model: nn.Module, seed: int) -> None:
    """Draw every tensor of the `state_dict` at random, so no constant or zero initial value hides a wrong key.

    Linear and convolution weights ~ N(0, 1/fan_in), norm scales ~ N(1, 0.1), every other tensor (biases,
    embeddings, relative positions) ~ N(0, 0.1) and the random Fourier features of the prompt encoder ~ N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            is_norm = "LayerNorm" in type(module).__name__
            saved = module.state_dict(keep_vars=True)  # not the pixel mean and std: they are constants, not weights
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if name not in saved:
                    continue
                noise = torch.randn(tensor.shape, generator=generator)
                if is_norm and name == "weight":
                    tensor.copy_(1.0 + 0.1 * noise)
                elif name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    fan_in = tensor[0].numel() if not isinstance(module, nn.ConvTranspose2d) else tensor[:, 0].numel()
                    tensor.copy_(noise * fan_in**-0.5)
                elif name == "positional_encoding_gaussian_matrix":
                    tensor.copy_(noise)
                else:
                    tensor.copy_(0.1 * noise)


def build_reference(size: str = "vit_b", seed: int = 0) -> Sam:
    """segment-anything's `sam_model_registry[size](checkpoint=None)` with every parameter perturbed."""
    sam: Sam = sam_model_registry[size](checkpoint=None)
    randomize(sam, seed)
    return sam.eval()


def build_tiny_reference(seed: int = 0) -> Sam:
    """A small `Sam` in the official layout: 128x128 input, 8x8 grid, a 2-layer ViT of width 32 with one global
    block and 3x3 windows (so windows need padding), the published prompt encoder and mask decoder.
    """
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=128,
            patch_size=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),  # pyright: ignore[reportArgumentType]
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=3,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    randomize(sam, seed)
    return sam.eval()
