"""refiners-lora: LoRA adapters for refiners models, and `LoraManager` for community LoRA files.

from refiners_lora import LoraManager

loras = LoraManager(model)
loras.add("pixel-art", "pixel-art.safetensors", scale=0.8)  # kohya, diffusers / PEFT or refiners keys
loras.create("mine", layer_paths, rank=8)  # a fresh trainable LoRA
loras.save("mine", "mine.safetensors", format="kohya")  # or "diffusers", "refiners"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports

if TYPE_CHECKING:
    from refiners_lora.adapter import Lora, LoraAdapter
    from refiners_lora.manager import LoraManager


__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Lora": "refiners_lora.adapter",
        "LoraAdapter": "refiners_lora.adapter",
        "LoraManager": "refiners_lora.manager",
    },
)

__all__ = ["Lora", "LoraAdapter", "LoraManager"]
