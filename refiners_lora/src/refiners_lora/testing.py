# pyright: basic
# (lycoris-lora and peft, whose adapters this testing module builds references from, have no type information.)
"""Helpers for tests and benchmarks of refiners-lora and of the packages whose models it adapts: reference LyCORIS
and PEFT adapters with random weights on plain torch models (diffusers, transformers), and the files they write.
Nothing here is used at runtime; `lycoris-lora` and `peft` (test extras) are imported inside the functions that
need them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

ADAPTER_PARAMETERS = ("hada_", "lokr_", "lora_", "dora_scale")
"""Parts of the names of the parameters that LyCORIS and PEFT adapters add to a model."""


def randomize_adapter(module: nn.Module, generator: torch.Generator, std: float = 0.2) -> None:
    """Draw every adapter parameter of `module` (name holding one of `ADAPTER_PARAMETERS`) from N(0, std): the
    references start some of them at zero. DoRA magnitudes (`dora_scale`, `lora_magnitude_vector`) get |N| + 1,
    positive as trained ones are."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if any(part in name for part in ADAPTER_PARAMETERS):
                values = torch.randn(parameter.shape, generator=generator) * std
                is_magnitude = "dora_scale" in name or "magnitude" in name
                parameter.copy_(values.abs() + 1.0 if is_magnitude else values)


def mixed_lycoris_module(index: int, name: str, layer: nn.Linear | nn.Conv2d) -> Any:
    """The `lycoris-lora` module for the `index`-th layer of a model, in turn: a LoHa, a LoKr (both with Tucker cores
    where the kernel is larger than 1x1) and a DoRA LoCon (`weight_decompose=True`); `name` is its kohya name."""
    from lycoris.modules import LoConModule, LohaModule, LokrModule  # lycoris-lora: a test extra of refiners-lora

    if index % 3 == 0:
        return LohaModule(name, layer, lora_dim=2, alpha=1, use_tucker=True)
    if index % 3 == 1:
        return LokrModule(name, layer, lora_dim=2, alpha=3, factor=4, use_tucker=True)
    return LoConModule(name, layer, lora_dim=3, alpha=2, weight_decompose=True)


def apply_lycoris(
    models: Mapping[str, nn.Module],
    kohya_name: Callable[[str, str], str],
    path: Path,
    seed: int = 4,
    module: Callable[[int, str, nn.Linear | nn.Conv2d], Any] = mixed_lycoris_module,
) -> list[Any]:
    """Wrap every Linear and Conv2d of `models` (component -> model, changed in place) with the `lycoris-lora` module
    `module(index, kohya name, layer)` makes (`mixed_lycoris_module` by default), random weights drawn by
    `randomize_adapter`, and write their kohya file to `path`, each module's keys under `kohya_name(component, module
    name)`. Returns the applied LyCORIS modules, in the order of the layers."""
    generator = torch.Generator().manual_seed(seed)
    layers = [
        (component, name, layer)
        for component, model in models.items()
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
    ]
    tensors: dict[str, torch.Tensor] = {}
    modules: list[Any] = []
    for index, (component, name, layer) in enumerate(layers):
        key = kohya_name(component, name)
        wrapper = module(index, key, layer)
        randomize_adapter(wrapper, generator)
        wrapper.eval().apply_to()
        modules.append(wrapper)
        for role, tensor in wrapper.custom_state_dict().items():
            tensors[f"{key}.{role}"] = tensor.detach().clone().contiguous()
    save_file(tensors, path)
    return modules


def write_peft_file(model: nn.Module, config: Any, path: Path, *, prefix: str = "", seed: int = 6) -> None:
    """Draw the adapter weights of `model` (holding PEFT adapters made from `config`, a `LoraConfig`, `LoHaConfig` or
    `LoKrConfig`) with `randomize_adapter`, then write `get_peft_model_state_dict(model)` to `path` with `prefix`
    before every key (diffusers writes `unet.`) and the rank and alpha in `lora_adapter_metadata`, as diffusers does."""
    from peft import get_peft_model_state_dict  # pyright: ignore[reportPrivateImportUsage]

    randomize_adapter(model, torch.Generator().manual_seed(seed))
    alpha = {"lora_alpha": config.lora_alpha} if hasattr(config, "lora_alpha") else {"alpha": config.alpha}
    metadata = {"lora_adapter_metadata": json.dumps({"r": config.r, **alpha}), "format": "pt"}
    state_dict: dict[str, torch.Tensor] = get_peft_model_state_dict(model)
    save_file({prefix + key: tensor.contiguous() for key, tensor in state_dict.items()}, path, metadata=metadata)
