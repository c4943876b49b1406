"""`refiners generate` with an SDXL model and the adapter options other packages register, every package installed
together: `--lora`, `--embedding`, `--controlnet` and `--freeu` are each declared for both `sd15` and `sdxl` (their
runs on SDXL are tested in tests/test_lora_sdxl.py and in refiners-textual-inversion's, refiners-controlnet's and
refiners-freeu's SDXL tests)."""

from __future__ import annotations

from refiners_core.plugins import registry

ADAPTER_OPTIONS = ("--lora", "--embedding", "--controlnet", "--freeu")


def test_every_adapter_option_is_installed_and_declared_for_sd15_and_sdxl() -> None:
    options = registry(reload=True).generate_options
    for flag in ADAPTER_OPTIONS:
        assert options[flag].applies_to("sd15") and options[flag].applies_to("sdxl"), flag
