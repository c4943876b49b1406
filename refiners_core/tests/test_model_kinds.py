"""`refiners_core.model_kinds`: the small-file readers a `ModelSpec.detect` uses, which never read weights, never
download and never raise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from refiners_core.model_kinds import detect_model, find_file, read_json, weight_keys

DETECTING_MODELS = """
from pathlib import Path

from refiners_core.plugins import ModelSpec, hookimpl


def broken(source):
    raise RuntimeError("a detect that breaks its contract")


def marked(source):
    return "it holds t-marker.txt" if (Path(source) / "t-marker.txt").is_file() else None


@hookimpl
def refiners_register_models(register):
    register(ModelSpec("t-broken", dict, detect=broken))
    register(ModelSpec("t-marked", dict, detect=marked))
"""


def test_find_file_looks_in_a_local_folder_and_its_subfolders(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")

    assert find_file(str(tmp_path), "config.json", subfolder="unet") == tmp_path / "unet" / "config.json"
    assert find_file(str(tmp_path), "model_index.json") is None
    assert find_file(str(tmp_path / "unet" / "config.json"), "model_index.json") is None  # a file is no folder
    assert find_file(str(tmp_path / "missing" / "model.ckpt"), "model_index.json") is None  # nor a hub id


def test_find_file_reads_a_hub_id_from_the_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--sdxl" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (cache / "models--acme--sdxl" / "refs").mkdir()
    (cache / "models--acme--sdxl" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))

    found = find_file("acme/sdxl", "model_index.json")

    assert found is not None and read_json(found) == {"_class_name": "StableDiffusionXLPipeline"}
    assert find_file("acme/sdxl", "config.json", subfolder="unet") is None  # not cached: not downloaded
    assert find_file("acme/not-cached", "model_index.json") is None


def test_read_json_gives_none_for_what_is_not_a_json_object(tmp_path: Path) -> None:
    for name, text in [("list.json", "[1, 2]"), ("broken.json", "{"), ("binary.json", "\xff")]:
        (tmp_path / name).write_text(text, encoding="latin-1")
        assert read_json(tmp_path / name) is None, name
    (tmp_path / "object.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    assert read_json(tmp_path / "object.json") == {"_class_name": "StableDiffusionPipeline"}
    assert read_json(None) is None and read_json(tmp_path / "missing.json") is None


def test_weight_keys_reads_a_safetensors_header_or_a_torch_checkpoint_memory_mapped(tmp_path: Path) -> None:
    save_file({"cond_stage_model.x": torch.zeros(2), "model.diffusion_model.y": torch.ones(1)}, str(tmp_path / "m.st"))
    torch.save({"state_dict": {"conditioner.embedders.0.x": torch.zeros(2)}, "global_step": 3}, tmp_path / "m.ckpt")
    torch.save({"cond_stage_model.x": torch.zeros(2)}, tmp_path / "flat.pt")
    torch.save({"state_dict": {}}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")

    assert sorted(weight_keys(tmp_path / "m.st") or []) == ["cond_stage_model.x", "model.diffusion_model.y"]
    assert weight_keys(tmp_path / "m.ckpt") == ["conditioner.embedders.0.x"]  # the state_dict entry, unwrapped
    assert weight_keys(tmp_path / "flat.pt") == ["cond_stage_model.x"]
    assert weight_keys(tmp_path / "legacy.ckpt") is None  # cannot be memory-mapped: not read
    assert weight_keys(tmp_path / "notes.ckpt") is None
    assert weight_keys(tmp_path / "empty.safetensors") is None
    assert weight_keys(tmp_path / "missing.safetensors") is None


def test_detect_model_names_the_first_registered_model_that_recognizes_a_source(
    plugin_site: Callable[..., str], tmp_path: Path
) -> None:
    plugin_site("t-detecting", DETECTING_MODELS)
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "t-marker.txt").write_text("")
    (tmp_path / "plain").mkdir()

    assert detect_model(str(tmp_path / "marked")) == ("t-marked", "it holds t-marker.txt")  # past the broken detect
    assert detect_model(str(tmp_path / "plain")) is None
