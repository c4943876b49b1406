"""Text views of models: the layer tree shown by `print(model)` and short descriptions of inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from refiners_core.fluxion.chain import Chain
    from refiners_core.fluxion.module import Module


def render_tree(chain: Chain) -> str:
    """The layer tree of `chain`: one line per layer with its name, class and key sizes.

    Consecutive siblings with the same structure are shown once (`(Chain_1 … Chain_12) Chain() ×12`), so a
    12-block transformer reads in one screen.
    """
    parameters = sum(p.numel() for p in chain.parameters())
    header = f"{chain.short_repr()}  [{_count(parameters)} parameters, {chain.device}, {_dtype_name(chain.dtype)}]"
    return "\n".join([header, *_children_lines(chain, prefix="")])


def _children_lines(chain: Chain, prefix: str) -> list[str]:
    groups: list[tuple[list[str], Module, list[str]]] = []  # names, first layer, structure signature
    for name, layer in chain.named_children():
        signature = [layer.short_repr(), *_subtree_lines(layer, prefix="")]  # type: ignore[operator, arg-type]
        if groups and type(groups[-1][1]) is type(layer) and groups[-1][2] == signature:
            groups[-1][0].append(name)
        else:
            groups.append(([name], layer, signature))  # type: ignore[arg-type]
    lines: list[str] = []
    for index, (names, layer, _) in enumerate(groups):
        branch, extension = ("└── ", "    ") if index == len(groups) - 1 else ("├── ", "│   ")
        lines.append(prefix + branch + _label(names, layer))
        lines.extend(_subtree_lines(layer, prefix + extension))
    return lines


def _subtree_lines(layer: Module, prefix: str) -> list[str]:
    from refiners_core.fluxion.chain import Chain

    return _children_lines(layer, prefix) if isinstance(layer, Chain) else []


def _label(names: list[str], layer: Module) -> str:
    description = layer.short_repr()
    if len(names) > 1:
        return f"({names[0]} … {names[-1]}) {description} ×{len(names)}"
    return description if names[0] == type(layer).__name__ else f"({names[0]}) {description}"


def _count(number: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= 1000 and round(number / size, 1) >= 1:
            return f"{number / size:.1f}{unit}"
    return str(number)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_inputs(inputs: Any) -> str:
    """`Tensor(shape=(2, 3), dtype=float32, device=cpu)`-style description of layer inputs, for errors."""
    values: tuple[Any, ...] = inputs if isinstance(inputs, tuple) else (inputs,)  # type: ignore[assignment]
    return "(" + ", ".join(_describe(value) for value in values) + ")"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={_dtype_name(value.dtype)}, device={value.device})"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "[" + ", ".join(_describe(item) for item in value) + "]"  # type: ignore[arg-type]
    return type(value).__name__
