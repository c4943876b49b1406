"""AdamW on the LoRA weights and its learning-rate schedule: warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from refiners_training.config import OptimizationConfig


def lr_factor(step: int, config: OptimizationConfig) -> float:
    """The learning rate of optimizer step `step` (from 0) as a fraction of `learning_rate`.

    Linear warmup over `lr_warmup_steps` (step `s < warmup` gets `(s + 1) / (warmup + 1)`), then `"constant"`: 1,
    `"linear"`: down to 0 at `max_steps`, `"cosine"`: half a cosine down to 0 at `max_steps`.
    """
    warmup = config.lr_warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.lr_scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimizationConfig) -> torch.optim.AdamW:
    """AdamW over `parameters` with the configured learning rate, betas, epsilon and weight decay."""
    return torch.optim.AdamW(
        list(parameters),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizationConfig) -> LambdaLR:
    """The learning-rate schedule of `lr_factor`, stepped once per optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, config))
