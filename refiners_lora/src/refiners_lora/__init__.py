"""refiners-lora: LoRA adapters for refiners models, and `LoraManager` for community LoRA files.

from refiners_lora import LoraManager

loras = LoraManager(model)
loras.add("pixel-art", "pixel-art.safetensors", scale=0.8)  # kohya, diffusers / PEFT or refiners keys
loras.create("mine", layer_paths, rank=8)  # a fresh trainable LoRA
loras.save("mine", "mine.safetensors", format="kohya")  # or "diffusers", "refiners"
"""

from refiners_lora.adapter import Lora, LoraAdapter
from refiners_lora.manager import LoraManager

__all__ = ["Lora", "LoraAdapter", "LoraManager"]
