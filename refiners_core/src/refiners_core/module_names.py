"""How a model names its layers in another library's convention: the protocol LoRA files (and any other
per-layer weights written against another library) are translated through.

A model package that wants, e.g., kohya or diffusers LoRA files to load onto its models implements one method::

    class MyUNet(fl.Chain):
        def foreign_module_names(self, convention: str) -> dict[str, str]:
            if convention == DIFFUSERS:
                return module_names(diffusers_state_dict_mapping(...))
            return {}

and consumers (`refiners-lora`) only test `isinstance(model, ForeignModuleNames)`: they never import the
model package.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, runtime_checkable

DIFFUSERS = "diffusers"
"""Module paths as diffusers / transformers / PEFT name them, e.g. `unet.down_blocks.0.attentions.0.proj_in`."""

KOHYA = "kohya"
"""Module names as kohya's sd-scripts writes them, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`."""

PARAMETER_NAMES = ("weight", "bias")


@runtime_checkable
class ForeignModuleNames(Protocol):
    """A model that can name its layers the way another library does."""

    def foreign_module_names(self, convention: str) -> Mapping[str, str]:
        """Foreign module name -> the path of our layer, relative to this object (as `named_modules` gives it).

        `convention` is e.g. `DIFFUSERS` or `KOHYA`. Several foreign names may lead to the same layer (aliases);
        a convention the model does not know gives an empty mapping. Must be cheap and must not touch weights.
        """
        ...


@runtime_checkable
class ForeignPointwiseConvolutions(Protocol):
    """A `ForeignModuleNames` model some of whose `fl.Linear` layers the other library runs as 1x1 convolutions."""

    def foreign_pointwise_convolutions(self, convention: str) -> Collection[str]:
        """The foreign module names (keys of `foreign_module_names(convention)`) of layers that are an `fl.Linear`
        here but a 1x1 convolution there (SD1's `proj_in` / `proj_out`): weights written for them, e.g. a LoRA's,
        must take the shape `(out, in, 1, 1)`. Must be cheap and must not touch weights.
        """
        ...


def module_names(state_dict_mapping: Mapping[str, str]) -> dict[str, str]:
    """Module name -> layer path, from a state-dict key mapping (`a.b.weight -> x.y.weight`).

    Keys that do not end in `.weight` or `.bias` (buffers...) are left out. Raises ValueError naming the
    module if its parameters map to two different layers.
    """
    names: dict[str, str] = {}
    for source, target in state_dict_mapping.items():
        module, _, parameter = source.rpartition(".")
        layer, _, our_parameter = target.rpartition(".")
        if parameter not in PARAMETER_NAMES or our_parameter != parameter:
            continue
        if names.setdefault(module, layer) != layer:
            raise ValueError(f"module '{module}' maps to two layers: `{names[module]}` and `{layer}`")
    return names


def prefixed(names: Mapping[str, str], foreign_prefix: str, our_prefix: str) -> dict[str, str]:
    """`names` with `foreign_prefix` before every foreign name and `our_prefix` before every layer path."""
    return {f"{foreign_prefix}{foreign}": f"{our_prefix}{ours}" for foreign, ours in names.items()}


def kohya_names(names: Mapping[str, str], prefix: str) -> dict[str, str]:
    """kohya names from diffusers ones: `prefix` + the diffusers module path with `.` replaced by `_`.

    E.g. `kohya_names({"down_blocks.0.resnets.0.conv1": p}, "lora_unet_")` gives
    `{"lora_unet_down_blocks_0_resnets_0_conv1": p}`. Raises ValueError if two names collide once flattened.
    """
    flattened: dict[str, str] = {}
    for foreign, ours in names.items():
        name = prefix + foreign.replace(".", "_")
        if flattened.setdefault(name, ours) != ours:
            raise ValueError(f"'{foreign}' and another module both flatten to the kohya name '{name}'")
    return flattened
