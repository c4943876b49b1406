"""`LoraAdapter` keeps every promise of an adapter (`refiners_core.testing.check_adapter`) on a small SD1.5 UNet."""

from __future__ import annotations

import torch

import refiners_core.fluxion as fl
from refiners_core.testing import check_adapter
from refiners_lora import LoraAdapter
from refiners_sd15.testing import small_unet_config
from refiners_sd15.unet import SD1UNet


def unet() -> SD1UNet:
    torch.manual_seed(0)
    return SD1UNet(small_unet_config()).eval()


GENERATOR = torch.Generator().manual_seed(1)
LATENTS = torch.randn(2, 4, 8, 8, generator=GENERATOR)
TEXT = torch.randn(2, 7, 32, generator=GENERATOR)


def run(model: fl.Chain) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    model.set_context("diffusion", {"timestep": torch.tensor([500]), "clip_text_embedding": TEXT.to(dtype)})
    return model(LATENTS)


def loras(model: fl.Chain) -> list[LoraAdapter]:
    """Random LoRAs (up weights not zero, so they change the output) on a Linear, a Conv2d and a stacked pair."""
    generator = torch.Generator().manual_seed(2)
    linears, convolutions = list(model.layers(fl.Linear)), list(model.layers(fl.Conv2d))
    adapters = [LoraAdapter(linears[3], rank=2), LoraAdapter(convolutions[2], rank=3), LoraAdapter(linears[5], rank=2)]
    for adapter in adapters:
        with torch.no_grad():
            adapter.lora.up.weight.normal_(generator=generator)
    return adapters


def test_lora_adapters_keep_every_adapter_promise() -> None:
    model = unet()

    report = check_adapter(
        loras,
        model,
        run,
        wrong_target=lambda m: LoraAdapter(m.ensure_find(fl.GroupNorm), rank=2),  # type: ignore[arg-type]
        wrong_target_names=f"not GroupNorm at `{model.ensure_find(fl.GroupNorm).get_path()}`",
    )

    assert "eject restores the model" in report.checked
    assert "fuse: not offered" in report.skipped  # LoraManager fuses, see test_lora_manager.py
