"""The installed plugin: its entry point loads and registers the `sdxl` model, whose loader is
`StableDiffusion_XL.from_pretrained`, and the `sdxl-refiner` that `refiners generate --refiner` runs after it."""

from __future__ import annotations

from refiners_core.plugins import registry, resolve
from refiners_sdxl import StableDiffusion_XL, StableDiffusion_XL_Refiner


def test_entry_point_registers_the_sdxl_model_and_its_refiner() -> None:
    loaded = registry(reload=True)
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-sdxl"]
    assert record.status == "ok", record.error
    assert record.entry_point == "sdxl = refiners_sdxl.plugin"
    assert record.models == ("sdxl", "sdxl-refiner")
    sdxl, refiner = loaded.models["sdxl"], loaded.models["sdxl-refiner"]
    assert resolve(sdxl.loader) == StableDiffusion_XL.from_pretrained
    assert (sdxl.refiner, sdxl.default_guidance, sdxl.default_size) == ("sdxl-refiner", 5.0, (1024, 1024))
    assert sdxl.solver_defaults is not None and sdxl.solver_defaults["timestep_spacing"] == "leading"
    assert resolve(refiner.loader) == StableDiffusion_XL_Refiner.from_pretrained
    assert refiner.generate is None  # not a --model of refiners generate: only its --refiner
    assert "sd15" in loaded.models  # refiners-sd15, a dependency, is loaded alongside
