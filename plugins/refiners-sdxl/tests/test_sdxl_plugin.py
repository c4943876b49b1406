"""The installed plugin: its entry point loads, and it registers no model until StableDiffusion_XL exists."""

from __future__ import annotations

from refiners_core.plugins import registry


def test_entry_point_loads_without_error() -> None:
    loaded = registry(reload=True)
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-sdxl"]
    assert record.status == "ok", record.error
    assert record.entry_point == "sdxl = refiners_sdxl.plugin"
    assert record.models == ()
    assert "sd15" in loaded.models  # refiners-sd15, a dependency, is loaded alongside
