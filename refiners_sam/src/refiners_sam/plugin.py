"""The refiners plugin of refiners-sam (entry point `sam = refiners_sam.plugin`)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, Reference, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="sam",
            loader=Reference("refiners_sam.model:SegmentAnything.from_pretrained"),
            summary="Segment Anything ViT-B/L/H: SegmentAnything.from_pretrained(official .pth checkpoint or hub id)",
        )
    )
