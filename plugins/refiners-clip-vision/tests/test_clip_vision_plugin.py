"""refiners-clip-vision as a plugin: found through its entry point, its `clip-vision` model in the registry (and in
`refiners plugins --json`), whose loader reads a transformers folder."""

from __future__ import annotations

from pathlib import Path

from refiners_clip_vision import CLIPImageEncoder
from refiners_clip_vision.testing import SMALL_VIT_H, write_reference_folder
from refiners_core.plugins import registry
from refiners_core.testing.plugins import discovered_plugin, listed_plugin


def test_refiners_clip_vision_is_discovered_through_its_entry_point() -> None:
    discovered_plugin("refiners-clip-vision", "clip_vision = refiners_clip_vision.plugin")
    spec = registry().models["clip-vision"]
    assert spec.generate is None  # an encoder, not something `refiners generate` runs


def test_refiners_plugins_lists_the_clip_vision_model() -> None:
    assert listed_plugin("refiners-clip-vision")["models"] == ["clip-vision"]


def test_the_registered_loader_reads_a_transformers_folder(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_H)
    encoder = registry().models["clip-vision"].loader(str(tmp_path))
    assert isinstance(encoder, CLIPImageEncoder) and encoder.config == SMALL_VIT_H
