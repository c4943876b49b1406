"""The installed plugin: its entry point loads and registers the `sdxl` model, whose loader is
`StableDiffusion_XL.from_pretrained`."""

from __future__ import annotations

from refiners_core.plugins import registry
from refiners_sdxl import StableDiffusion_XL


def test_entry_point_registers_the_sdxl_model() -> None:
    loaded = registry(reload=True)
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-sdxl"]
    assert record.status == "ok", record.error
    assert record.entry_point == "sdxl = refiners_sdxl.plugin"
    assert record.models == ("sdxl",)
    assert loaded.models["sdxl"].loader == StableDiffusion_XL.from_pretrained
    assert "sd15" in loaded.models  # refiners-sd15, a dependency, is loaded alongside
