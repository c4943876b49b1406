"""refiners-lora: LoRA adapters for refiners models."""

from refiners_lora.adapter import Lora, LoraAdapter

__all__ = ["Lora", "LoraAdapter"]
