"""`LoraAdapter` keeps every promise of an adapter (`refiners_core.testing.check_adapter`), on Linear and Conv2d
targets, stacked and not."""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.testing import check_adapter
from refiners_lora import LoraAdapter

INPUTS = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)),)


def model() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(
        fl.Conv2d(3, 8, 3, padding=1),
        fl.SiLU(),
        fl.Conv2d(8, 8, 1),
        fl.Flatten(1),
        fl.Linear(8 * 4 * 4, 16),
        fl.SiLU(),
        fl.Linear(16, 5),
    ).eval()


def loras(on: fl.Chain) -> list[LoraAdapter]:
    """Random LoRAs (up weights not zero, so they change the output) on a 3x3 and a 1x1 Conv2d, a Linear, and a
    second LoRA stacked on that Linear."""
    generator = torch.Generator().manual_seed(2)
    convolutions, linears = list(on.layers(fl.Conv2d)), list(on.layers(fl.Linear))
    adapters = [
        LoraAdapter(convolutions[0], rank=2),
        LoraAdapter(convolutions[1], rank=3),
        LoraAdapter(linears[0], rank=2),
        LoraAdapter(linears[0], rank=4),  # built before the first is injected: both stack on the same Linear
    ]
    for adapter in adapters:
        with torch.no_grad():
            adapter.lora.up.weight.normal_(generator=generator)
    return adapters


def test_lora_adapters_keep_every_adapter_promise() -> None:
    chain = model()

    report = check_adapter(
        loras,
        chain,
        INPUTS,
        wrong_target=lambda on: LoraAdapter(on.ensure_find(fl.SiLU), rank=2),  # type: ignore[arg-type]
        wrong_target_names=f"not SiLU at `{chain.ensure_find(fl.SiLU).get_path()}`",
    )

    assert "eject restores the model" in report.checked
    assert "fuse: not offered" in report.skipped  # LoraManager fuses, see test_lora_manager.py
