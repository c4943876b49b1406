"""refiners-clip-vision's plugin module (entry point `clip_vision = refiners_clip_vision.plugin`).

It registers the `clip-vision` model (`CLIPImageEncoder.from_pretrained`); nothing is built or read here.
"""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, Reference, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="clip-vision",
            loader=Reference("refiners_clip_vision.encoder:CLIPImageEncoder.from_pretrained"),
            summary="CLIP image encoder (ViT-H/14, ViT-bigG/14): CLIPImageEncoder.from_pretrained(transformers "
            "CLIPVisionModelWithProjection folder or hub id, subfolder=...)",
        )
    )
