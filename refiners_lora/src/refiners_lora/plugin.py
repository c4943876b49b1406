"""refiners-lora's plugin module, registered under the `refiners` entry point group."""

from __future__ import annotations

from collections.abc import Callable

import refiners_core.fluxion as fl
from refiners_core.plugins import AdapterSpec, hookimpl
from refiners_lora.adapter import LoraAdapter


@hookimpl
def refiners_register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="lora",
            factory=LoraAdapter,
            summary="Low-rank adaptation (LoRA) of Linear and Conv2d layers: LoraAdapter(target, rank, scale)",
            targets=(fl.Linear, fl.Conv2d),
        )
    )
