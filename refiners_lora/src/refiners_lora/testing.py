# pyright: basic
# (lycoris-lora and peft, whose adapters this testing module builds references from, have no type information.)
"""Helpers for tests and benchmarks of refiners-lora and of the packages whose models it adapts: reference LyCORIS
and PEFT adapters with random weights on plain torch models (diffusers, transformers), and the files they write;
kohya and PEFT LoRA files drawn at random with the deltas to fuse by hand into the references; random weights for
created LoRAs; and the check that a model is back as it was before any LoRA.
Nothing here is used at runtime; `lycoris-lora` and `peft` (test extras) are imported inside the functions that
need them."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.testing import assert_state_unchanged
from refiners_lora.adapter import LoraAdapter
from refiners_lora.delta_adapter import DeltaAdapter
from refiners_lora.manager import LoraManager

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


def assert_lora_free(model: nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    """Assert `model` is back as it was before any LoRA: its state dict is `before` bit for bit (a
    `refiners_core.testing.state_snapshot` taken then), no LoRA or LyCORIS adapter is left in it, and
    `LoraManager(model)` lists no LoRA."""
    assert_state_unchanged(model, before)
    assert not any(isinstance(layer, LoraAdapter | DeltaAdapter) for layer in model.modules())
    assert LoraManager(model).names == ()


def randomize_loras(adapters: Iterable[LoraAdapter], seed: int, std: float) -> None:
    """Draw every parameter of the adapters' LoRAs (`down` and `up`: `LoraManager.create` starts `up` at zero)
    from N(0, std), in order, from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters:
            for parameter in adapter.lora.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


Delta = tuple[str, str, torch.Tensor, torch.Tensor, float]
"""One LoRA module of a reference file: (component, module name, down, up, alpha / rank)."""
LoraTargets = Iterable[tuple[str, str, nn.Linear | nn.Conv2d]]
"""(component, module name, module) of the layers of reference models that a LoRA file patches."""


def linear_and_conv_layers(models: Mapping[str, nn.Module]) -> Iterator[tuple[str, str, nn.Linear | nn.Conv2d]]:
    """(component, module name, module) of every Linear and Conv2d of `models` (component -> model), in order."""
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                yield component, name, module


def random_lora(
    module: nn.Linear | nn.Conv2d, rank: int, generator: torch.Generator, std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) drawn from N(0, std): LoCon for a convolution (down with the kernel, 1x1 up), matrices for a
    linear."""
    if isinstance(module, nn.Conv2d):
        down_shape: tuple[int, ...] = (rank, module.in_channels, *module.kernel_size)
        up_shape: tuple[int, ...] = (module.out_channels, rank, 1, 1)
    else:
        down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
    return torch.randn(down_shape, generator=generator) * std, torch.randn(up_shape, generator=generator) * std


def kohya_lora(
    targets: LoraTargets, kohya_name: Callable[[str, str], str], seed: int, *, rank: int = 4, std: float
) -> tuple[dict[str, torch.Tensor], list[Delta]]:
    """A kohya LoRA file's tensors on every layer of `targets` (LoCon on convolutions), each module named
    `kohya_name(component, module name)` (`lora_unet_...`), a float16 alpha on every other module only; and its
    deltas."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: list[Delta] = []
    for index, (component, name, module) in enumerate(targets):
        key = kohya_name(component, name)
        down, up = random_lora(module, rank, generator, std)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        alpha = None if index % 2 else float(index % 5 + 1)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        deltas.append((component, name, down, up, (alpha or rank) / rank))
    return tensors, deltas


def peft_lora(
    targets: LoraTargets,
    published_name: Callable[[str, str], str],
    seed: int,
    *,
    rank: int = 3,
    std: float,
    alphas: Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Delta]]:
    """A diffusers / PEFT LoRA file's tensors (lora_A / lora_B) on the attention, feed-forward and MLP layers of
    `targets`, each module named `{component}.{published_name(component, module name)}` (`unet.down_blocks...`), with
    an `alpha` key on the modules of the components in `alphas` (component -> alpha); and its deltas."""
    alphas = alphas or {}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: list[Delta] = []
    for component, name, module in targets:
        if not any(part in name for part in ("attn", "ff.", "mlp", "proj_in", "proj_out")):
            continue
        key = f"{component}.{published_name(component, name)}"
        down, up = random_lora(module, rank, generator, std)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        if component in alphas:
            tensors[f"{key}.alpha"] = torch.tensor(alphas[component])
        deltas.append((component, name, down, up, alphas[component] / rank if component in alphas else 1.0))
    return tensors, deltas


def fuse_by_hand(model: nn.Module, deltas: Iterable[Delta], scale: float) -> None:
    """Add `scale * alpha / rank * up @ down` to the weight of each delta's module in `model` (for a convolution:
    the kernel of the 1x1 up after the down), in place; `model` is the deltas' component."""
    with torch.no_grad():
        for _, name, down, up, factor in deltas:
            weight = model.get_submodule(name).weight
            assert isinstance(weight, torch.Tensor)
            weight.add_((scale * factor * torch.einsum("or,r...->o...", up.flatten(1), down)).reshape(weight.shape))


def fused(models: Mapping[str, nn.Module], *loras: tuple[list[Delta], float]) -> dict[str, nn.Module]:
    """Copies of `models` (component -> model) with the deltas of each (deltas, scale) fused by hand."""
    copies = {component: copy.deepcopy(model) for component, model in models.items()}
    for deltas, scale in loras:
        for component, model in copies.items():
            fuse_by_hand(model, [delta for delta in deltas if delta[0] == component], scale)
    return copies


class ConvAndLinears(fl.Chain):
    """A small model for LoRA tests, named by its layer paths only: a LoCon-able 3x3 `Conv2d` (3 -> 8 channels,
    stride 2) whose positions go through `Linear_1` (8 -> 16), a `LayerNorm` and `Linear_2` (16 -> 4), then
    `extra_linears` more Linears (4 -> 4). Subclass it to give it the name that the tests' messages expect."""

    def __init__(self, extra_linears: int = 0) -> None:
        super().__init__(
            fl.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
            fl.SiLU(),
            fl.Flatten(-2, -1),
            fl.Transpose(-1, -2),
            fl.Linear(8, 16),
            fl.LayerNorm(16),
            fl.Linear(16, 4),
            *(fl.Linear(4, 4) for _ in range(extra_linears)),
        )


def assert_lora_changes_only_its_generation(generate: Callable[..., int], folder: Path, lora: str) -> None:
    """With `generate(out, *options)` running `refiners generate` into the image `out`: a run with `--lora LORA`
    makes another image than a plain run before it, and a plain run after it the same image as the first (nothing
    stays loaded). The images are written in `folder` as plain.png, lora.png and again.png."""
    from PIL import Image

    assert generate(folder / "plain.png") == 0
    assert generate(folder / "lora.png", "--lora", lora) == 0
    assert generate(folder / "again.png") == 0
    plain, styled, again = (Image.open(folder / name).tobytes() for name in ("plain.png", "lora.png", "again.png"))
    assert styled != plain and again == plain
