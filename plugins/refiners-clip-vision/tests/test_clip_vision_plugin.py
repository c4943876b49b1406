"""refiners-clip-vision as a plugin: found through its entry point, its `clip-vision` model in the registry (and in
`refiners plugins --json`), whose loader reads a transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refiners_clip_vision import CLIPImageEncoder
from refiners_clip_vision.testing import SMALL_VIT_H, write_reference_folder
from refiners_core.cli import main
from refiners_core.plugins import registry


def test_refiners_clip_vision_is_discovered_through_its_entry_point() -> None:
    records = [record for record in registry(reload=True).plugins if record.distribution == "refiners-clip-vision"]
    assert len(records) == 1
    assert records[0].entry_point == "clip_vision = refiners_clip_vision.plugin"
    assert records[0].error is None and records[0].status == "ok"
    spec = registry().models["clip-vision"]
    assert spec.generate is None  # an encoder, not something `refiners generate` runs


def test_refiners_plugins_lists_the_clip_vision_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    records = [r for r in json.loads(capsys.readouterr().out) if r["distribution"] == "refiners-clip-vision"]
    assert len(records) == 1 and records[0]["models"] == ["clip-vision"]


def test_the_registered_loader_reads_a_transformers_folder(tmp_path: Path) -> None:
    write_reference_folder(tmp_path, SMALL_VIT_H)
    encoder = registry().models["clip-vision"].loader(str(tmp_path))
    assert isinstance(encoder, CLIPImageEncoder) and encoder.config == SMALL_VIT_H
